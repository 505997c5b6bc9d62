// The streaming guide's JavaScript example, verbatim but for the endpoint URL, on the client
// version the guide was written for (HfInferenceEndpoint, @huggingface/inference 2.x).
// Usage: node guide.mjs URL
import { HfInferenceEndpoint } from 'hf-inference-v2'

const hf = new HfInferenceEndpoint(process.argv[2], 'hf_YOUR_TOKEN')

// prompt
const prompt = 'What can you do in Nuremberg, Germany? Give me 3 Tips'

const stream = hf.textGenerationStream({ inputs: prompt })
for await (const r of stream) {
  // yield the generated token
  process.stdout.write(r.token.text)
}
