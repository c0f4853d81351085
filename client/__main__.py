"""`python -m bitnet_grpc.client COMMAND ...`: the client CLI without the console script."""

import sys

from bitnet_grpc.client.cli import main

sys.exit(main())
