// The openai package's Responses stream helper against a Sluice server.
// Usage: node responses.mjs URL BODY_JSON
// Streams client.responses.stream(BODY) and prints one JSON line: the event types in order, the text
// deltas, and the final response's status and output_text (finalResponse() needs response.completed).
import OpenAI from "openai";

const [url, body] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "-", maxRetries: 0 });
const stream = client.responses.stream(JSON.parse(body));
const types = [];
const deltas = [];
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "response.output_text.delta") deltas.push(event.delta);
}
const final = await stream.finalResponse();
console.log(JSON.stringify({ types, deltas, status: final.status, text: final.output_text }));
