// The streaming guide's JavaScript example against a Sluice server.
// Usage: node stream.mjs URL PROMPT MAX_NEW_TOKENS
// Prints the tokens streamed by textGenerationStream({endpointUrl}), a line "---", then the tokens
// streamed through InferenceClient(...).endpoint(url) (HfInferenceEndpoint's successor).
import { InferenceClient, textGenerationStream } from "@huggingface/inference";

const [url, inputs, maxNewTokens] = process.argv.slice(2);
// temperature 0: greedy, so the test can compare with the server's non-streamed text.
const parameters = { max_new_tokens: Number(maxNewTokens), temperature: 0 };

for await (const r of textGenerationStream({ endpointUrl: url, inputs, parameters })) {
  process.stdout.write(r.token.text);
}
process.stdout.write("\n---\n");

const hf = new InferenceClient().endpoint(url);
for await (const r of hf.textGenerationStream({ inputs, parameters })) {
  process.stdout.write(r.token.text);
}
