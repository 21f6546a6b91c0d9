// Loads a smolbox export from a local folder with transformers.js (as a user of HF's published SmolVLM ONNX files
// would) and generates greedily with each requested dtype, twice: from inputs made by transformers.js's own
// processor, and from the exact arrays smolbox's tests made (so tokens can be compared with smolbox's runtime).
// Usage: node generate.mjs request.json  ->  one JSON object on stdout. No network: remote models are off and
// fetch throws.
import fs from 'node:fs';
import path from 'node:path';
import { env, AutoProcessor, AutoModelForImageTextToText, RawImage, Tensor } from '@huggingface/transformers';

const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(request.model_dir) + path.sep;
env.fetch = () => {
    throw new Error('network access attempted during an offline check');
};
const modelId = path.basename(request.model_dir);

const ARRAYS = { int64: BigInt64Array, float32: Float32Array, bool: Uint8Array };

function readTensor({ file, dtype, dims }) {
    const bytes = fs.readFileSync(file);
    const Type = ARRAYS[dtype];
    const data = new Type(bytes.buffer, bytes.byteOffset, bytes.byteLength / Type.BYTES_PER_ELEMENT);
    return new Tensor(dtype, Type.from(data), dims);
}

const newTokens = (sequences, promptLength) => sequences.slice(null, [promptLength, null]).tolist()[0].map(Number);

const processor = await AutoProcessor.from_pretrained(modelId);
const text = processor.apply_chat_template(request.messages, { add_generation_prompt: true });
const own = await processor(text, [await RawImage.read(request.image)]);
const given = Object.fromEntries(Object.entries(request.inputs).map(([name, spec]) => [name, readTensor(spec)]));

const result = { version: env.version, prompt_input_ids: own.input_ids.tolist()[0].map(Number), dtypes: {} };
for (const dtype of request.dtypes) {
    const model = await AutoModelForImageTextToText.from_pretrained(modelId, { dtype, device: 'cpu' });
    const options = { max_new_tokens: request.max_new_tokens, do_sample: false };
    const fromProcessor = await model.generate({ ...own, ...options });
    const fromArrays = await model.generate({ ...given, ...options });
    result.dtypes[dtype] = {
        own_inputs: newTokens(fromProcessor, own.input_ids.dims[1]),
        given_inputs: newTokens(fromArrays, given.input_ids.dims[1]),
    };
    await model.dispose();
}
process.stdout.write(JSON.stringify(result));
