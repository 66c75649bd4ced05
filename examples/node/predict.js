#!/usr/bin/env node
// A Node.js client of digitserve.v1.DigitService: loads the repository's .proto at run time
// (@grpc/proto-loader, no generated code), sends one image to Predict with a deadline and prints the
// probabilities and the predicted digit.
//
//   node predict.js --target 127.0.0.1:50051 --data-dir ../../data --index 0   # an MNIST test image
//   node predict.js --target 127.0.0.1:50051 --synthetic                       # a drawn "1"
//
// Exit codes: 0 answered, 1 the call failed or nothing answers at the target (one line on stderr, at
// once), 2 usage error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const zlib = require("node:zlib");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO = path.join(__dirname, "..", "..", "protos", "digitserve", "v1", "digit_service.proto");
const USAGE = `usage: node predict.js [--target HOST:PORT] (--data-dir DIR [--index N] | --synthetic)
                       [--model-version N] [--timeout SECONDS] [--proto FILE] [--json]`;

class UsageError extends Error {}

function options(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        target: { type: "string", default: process.env.MNIST_TARGET || "127.0.0.1:50051" },
        "data-dir": { type: "string" },
        index: { type: "string", default: "0" },
        synthetic: { type: "boolean", default: false },
        "model-version": { type: "string", default: "0" },
        timeout: { type: "string", default: "10" },
        proto: { type: "string", default: DEFAULT_PROTO },
        json: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
    }).values;
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (parsed.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (Boolean(parsed["data-dir"]) === parsed.synthetic) {
    throw new UsageError("give exactly one of --data-dir or --synthetic");
  }
  for (const name of ["index", "model-version"]) {
    if (!/^[0-9]+$/.test(parsed[name])) throw new UsageError(`--${name} ${parsed[name]}: expected an integer >= 0`);
  }
  const timeout = Number(parsed.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout ${parsed.timeout}: expected seconds > 0`);
  return { ...parsed, index: Number(parsed.index), modelVersion: Number(parsed["model-version"]), timeout };
}

// Image `index` of the IDX file t10k-images-idx3-ubyte(.gz) in dataDir: rows*cols bytes, row-major.
function idxImage(dataDir, index) {
  const names = ["t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"];
  const file = names.map((n) => path.join(dataDir, n)).find((f) => fs.existsSync(f));
  if (!file) throw new Error(`${dataDir}: no ${names.join(" or ")}`);
  let data = fs.readFileSync(file);
  if (data[0] === 0x1f && data[1] === 0x8b) data = zlib.gunzipSync(data);
  if (data.length < 16 || data.readUInt32BE(0) !== 0x00000803) {
    throw new Error(`${file}: not an IDX file of unsigned-byte images (magic 0x00000803)`);
  }
  const [count, rows, cols] = [data.readUInt32BE(4), data.readUInt32BE(8), data.readUInt32BE(12)];
  if (data.length !== 16 + count * rows * cols) {
    throw new Error(`${file}: ${data.length - 16} bytes of pixels, header declares ${count}×${rows}×${cols}`);
  }
  if (index >= count) throw new Error(`--index ${index}: ${file} holds ${count} images (0..${count - 1})`);
  const size = rows * cols;
  return Buffer.from(data.subarray(16 + index * size, 16 + (index + 1) * size));
}

// A "1": a two-pixel-wide vertical stroke through the middle of a black image of the model's shape.
function syntheticImage(rows, cols) {
  const image = Buffer.alloc(rows * cols);
  const top = Math.floor(rows / 7);
  const left = Math.floor(cols / 2) - 1;
  for (let r = top; r < rows - top; r++) {
    image[r * cols + left] = 255;
    image[r * cols + left + 1] = 255;
  }
  return image;
}

function call(client, method, request, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

class ConnectError extends Error {}

// The one line of a failed connection, from the UNAVAILABLE details of a call made without waiting
// for the channel (gRPC fails it at once with the last error), with what to do.
function connectFailure(client, target, deadline) {
  return new Promise((resolve) => {
    client.makeUnaryRequest("/digitserve.client.Connectivity/Probe", (b) => b, (b) => b, Buffer.alloc(0),
      { deadline, waitForReady: false }, (err) => {
        const details = (err && err.details) || "";
        let reason = details || "the connection failed";
        if (details.includes("ECONNREFUSED")) {
          reason = "connection refused (is mnist-serve running?); start it (mnist-serve --model-repo models) " +
            "or give --target HOST:PORT (MNIST_TARGET)";
        } else if (details.includes("Name resolution failed")) {
          reason = "the name does not resolve; give --target HOST:PORT (MNIST_TARGET)";
        }
        resolve(new ConnectError(`cannot connect to ${target}: ${reason}`));
      });
  });
}

// Connects the client's channel: resolves once it is READY; rejects at once with ConnectError when
// a connection attempt fails (TRANSIENT_FAILURE: nothing listens, the name does not resolve), not
// after the whole deadline as client.waitForReady would (it waits through gRPC's reconnects).
function connect(client, target, deadline) {
  const channel = client.getChannel();
  const { READY, TRANSIENT_FAILURE, SHUTDOWN } = grpc.connectivityState;
  return new Promise((resolve, reject) => {
    const check = () => {
      const state = channel.getConnectivityState(true);
      if (state === READY) return resolve();
      if (state === TRANSIENT_FAILURE || state === SHUTDOWN) return connectFailure(client, target, deadline).then(reject);
      channel.watchConnectivityState(state, deadline, (err) => {
        if (err) reject(new ConnectError(`cannot connect to ${target}: no answer before the deadline (--timeout)`));
        else check();
      });
    };
    check();
  });
}

async function main(argv) {
  const opts = options(argv);
  const definition = protoLoader.loadSync(opts.proto, {
    keepCase: true, // field names as in the .proto (model_version, class_index)
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { DigitService } = grpc.loadPackageDefinition(definition).digitserve.v1;
  const client = new DigitService(opts.target, grpc.credentials.createInsecure());
  // One deadline for the whole exchange: connecting, the model info (synthetic image) and Predict.
  const deadline = new Date(Date.now() + opts.timeout * 1000);
  try {
    await connect(client, opts.target, deadline);
    let image;
    if (opts.synthetic) {
      const info = await call(client, "GetModelInfo", { model_version: opts.modelVersion }, deadline);
      const [rows, cols] = info.input_shape.length === 2 ? info.input_shape : [1, info.input_size];
      image = syntheticImage(rows, cols);
    } else {
      image = idxImage(opts["data-dir"], opts.index);
    }
    const response = await call(
      client,
      "Predict",
      { images: [{ uint8: image }], model_version: opts.modelVersion },
      deadline,
    );
    const p = response.predictions[0];
    if (opts.json) {
      console.log(JSON.stringify({
        model_name: response.model_name,
        model_version: response.model_version,
        class_index: p.class_index,
        label: p.label,
        probability: p.probability,
        probabilities: p.probabilities,
      }));
    } else {
      console.log(`model ${response.model_name} version ${response.model_version}`);
      console.log(`predicted digit: ${p.label} (probability ${p.probability.toFixed(4)})`);
      p.probabilities.forEach((value, k) => console.log(`  ${k}: ${value.toFixed(6)}`));
    }
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  () => process.exit(0),
  (err) => {
    if (err instanceof UsageError) {
      console.error(`${USAGE}\npredict.js: error: ${err.message}`);
      process.exit(2);
    }
    if (err instanceof ConnectError) {
      console.error(`predict.js: ${err.message}`);
      process.exit(1);
    }
    const where = err.code !== undefined && grpc.status[err.code] ? `${grpc.status[err.code]}: ${err.details}` : err.message;
    console.error(`predict.js: ${where}`);
    process.exit(1);
  },
);
