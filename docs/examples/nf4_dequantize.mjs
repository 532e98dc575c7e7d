// NF4 dequantization from a golden vector, in plain JavaScript (Node >= 18; no packages).
// Run from the repository root:  node docs/examples/nf4_dequantize.mjs [path/to/case.safetensors]
// `.mjs` because it is an ES module (`import`; spec/vectors.md's reader also uses top-level await):
// Node 18-20 refuse both in a `.js` file outside a package that declares "type": "module".
import { readFileSync } from "node:fs";

const path = process.argv[2] ??
  "refimpl/golden/v1/quant.dequantize_4bit/case0_nf4_bs64_plain_float32_4x64.safetensors";
const buf = readFileSync(path);

// safetensors: 8-byte little-endian header length n, n bytes of JSON, then the raw little-endian data
const n = Number(buf.readBigUInt64LE(0));
const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
const meta = JSON.parse(header.__metadata__.refimpl);
// F16: Node < 24 has no Float16Array, so read the raw bits (Uint16Array) and decode them yourself
const ARRAYS = { F64: Float64Array, F32: Float32Array, F16: globalThis.Float16Array ?? Uint16Array,
                 I64: BigInt64Array, U8: Uint8Array, BOOL: Uint8Array };

function tensor(name) {
  const t = header[name];
  if (!t) throw new Error(`${path}: no tensor ${name}`);
  const [a, b] = t.data_offsets;                     // relative to the first byte after the header
  const bytes = buf.subarray(8 + n + a, 8 + n + b);
  const copy = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length);  // aligned copy
  return { dtype: t.dtype, shape: t.shape, data: new ARRAYS[t.dtype](copy) };
}

// The QuantState argument `state` is stored as bitsandbytes' serialized dict under `input.state.*`:
// absmax (one scale per block), quant_map (the 16-entry code), and a JSON blob stored as U8 bytes.
const qsName = Object.keys(header).find(k => k.startsWith("input.state.quant_state.bitsandbytes__"));
const qs = JSON.parse(Buffer.from(tensor(qsName).data).toString("utf8"));
if (qs.quant_type !== "nf4" || "nested_blocksize" in qs || qs.dtype !== "float32") {
  throw new Error(`${path}: this example reads a plain (not double-quantized) float32 NF4 case, got ${JSON.stringify(qs)}`);
}
const packed = tensor("input.packed").data;          // U8: two 4-bit codes per byte, first in the high nibble
const absmax = tensor("input.state.absmax").data;    // F32, one per block of qs.blocksize elements
const code = tensor("input.state.quant_map").data;   // F32, the NF4 table (index = nibble)
const expected = tensor("output.out");               // F32, shape qs.shape

const numel = qs.shape.reduce((p, d) => p * d, 1);
const out = new Float32Array(numel);
for (let i = 0; i < numel; i++) {
  const byte = packed[i >> 1];
  const nibble = (i & 1) === 0 ? byte >> 4 : byte & 0x0f;
  out[i] = Math.fround(code[nibble] * absmax[Math.floor(i / qs.blocksize)]);  // one float32 rounding
}

// compare bit for bit: the float32 bit patterns, so -0.0 != +0.0 and NaN == NaN (same payload)
const got = new Uint32Array(out.buffer);
const want = new Uint32Array(expected.data.buffer);
let same = 0;
for (let i = 0; i < numel; i++) if (got[i] === want[i]) same++;
console.log(`${meta.op} ${meta.case}: shape [${qs.shape}], blocksize ${qs.blocksize}, ` +
            `${absmax.length} blocks, tolerance ${meta.tolerance}`);
console.log(`out[0..3] = ${Array.from(out.subarray(0, 4)).join(", ")}`);
console.log(`${same} of ${numel} elements match bit for bit`);
process.exit(same === numel ? 0 : 1);
