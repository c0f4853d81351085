#!/usr/bin/env node
// Stream a completion from a bitnet-grpc server, in Node.js.
//
// The service definition is read at run time from the repository's proto file (no generated code), the
// same file the Python stubs are built from, so this client follows the API as it is.
//
//   node generate.js [--target 127.0.0.1:50051] [--max-tokens 32] [--temperature 0] [--seed 1]
//                    [--stop STR] [--ignore-eos] [--timeout SECONDS] [--json] [--proto PATH] "prompt"
//
// Text goes to stdout as it arrives; a summary (finish reason, token counts) goes to stderr. With --json
// every streamed message is printed as one JSON line instead. Exit status 1 on a gRPC error.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO = path.resolve(__dirname, "..", "..", "protos", "bitnet", "v1", "generation.proto");

// Flags with a value, mapped to GenerateRequest fields (snake_case, as in the proto).
const VALUE_FLAGS = {
  "--max-tokens": ["max_tokens", Number],
  "--temperature": ["temperature", Number],
  "--top-k": ["top_k", Number],
  "--top-p": ["top_p", Number],
  "--min-p": ["min_p", Number],
  "--repetition-penalty": ["repetition_penalty", Number],
  "--seed": ["seed", String], // uint64: passed as a decimal string so no precision is lost
  "--logprobs": ["logprobs", Number],
  "--request-id": ["request_id", String],
};

function usage(message) {
  if (message) console.error(`generate.js: ${message}`);
  console.error(
    "usage: node generate.js [--target HOST:PORT] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]\n" +
      "                        [--min-p P] [--repetition-penalty R] [--seed S] [--logprobs N] [--stop STR]...\n" +
      "                        [--ignore-eos] [--timeout SECONDS] [--json] [--proto PATH] PROMPT",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const options = { target: "127.0.0.1:50051", timeout: 600, json: false, proto: DEFAULT_PROTO };
  const request = { stop: [] };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg in VALUE_FLAGS) {
      const [field, convert] = VALUE_FLAGS[arg];
      const value = convert(next());
      if (convert === Number && !Number.isFinite(value)) usage(`${arg} needs a number`);
      request[field] = value;
    } else if (arg === "--stop") request.stop.push(next());
    else if (arg === "--ignore-eos") request.ignore_eos = true;
    else if (arg === "--target") options.target = next();
    else if (arg === "--timeout") options.timeout = Number(next());
    else if (arg === "--json") options.json = true;
    else if (arg === "--proto") options.proto = next();
    else if (arg === "-h" || arg === "--help") usage();
    else if (arg.startsWith("--")) usage(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (positional.length !== 1) usage("give exactly one prompt");
  request.prompt = positional[0];
  return { options, request };
}

function loadService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names exactly as in the proto (max_tokens, finish_reason, ...)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).bitnet.v1.TextGeneration;
}

function main() {
  const { options, request } = parseArgs(process.argv.slice(2));
  const TextGeneration = loadService(options.proto);
  const client = new TextGeneration(options.target, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + options.timeout * 1000);
  const call = client.Generate(request, { deadline });

  let last = null;
  let failed = false;
  call.on("data", (message) => {
    if (options.json) process.stdout.write(JSON.stringify(message) + "\n");
    else process.stdout.write(message.text);
    if (message.finish_reason !== "FINISH_REASON_UNSPECIFIED") last = message;
  });
  call.on("error", (error) => {
    const code = grpc.status[error.code] || error.code;
    console.error(`generate.js: ${code}: ${error.details}`);
    process.exitCode = 1;
    failed = true;
    client.close();
  });
  call.on("end", () => {
    if (failed) return; // grpc-js may still end the stream after an error
    if (!options.json) process.stdout.write("\n");
    if (last && last.usage) {
      const reason = last.finish_reason.replace("FINISH_REASON_", "").toLowerCase();
      console.error(`[${reason}: ${last.usage.prompt_tokens} prompt + ${last.usage.completion_tokens} tokens]`);
    }
    client.close();
  });
}

main();
