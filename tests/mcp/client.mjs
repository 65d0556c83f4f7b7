// An MCP client built on the official TypeScript SDK (@modelcontextprotocol/sdk), run by
// tests/tests/api_mcp.rs against the real Worker's POST /mcp. It connects over the
// Streamable HTTP transport with an admin's bearer token, lists the tools, calls each
// with the arguments given in MCP_CALLS (a JSON array of {name, arguments}), and prints
// one JSON object: {serverVersion, protocolVersion, tools, results}. Any failure exits 1.
//
// Env: MCP_URL (the Worker's /mcp), MCP_TOKEN (bearer), MCP_CALLS.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.env.MCP_URL;
const token = process.env.MCP_TOKEN;
const calls = JSON.parse(process.env.MCP_CALLS ?? "[]");
if (!url || !token) {
  console.error("MCP_URL and MCP_TOKEN are required");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "cmb-mcp-test", version: "1.0.0" });
try {
  await client.connect(transport);
  const { tools } = await client.listTools();
  const results = [];
  for (const call of calls) {
    // The SDK checks structuredContent against the tool's outputSchema.
    results.push(await client.callTool(call));
  }
  console.log(
    JSON.stringify({
      serverVersion: client.getServerVersion(),
      protocolVersion: transport.protocolVersion ?? null,
      tools,
      results,
    }),
  );
  await client.close();
} catch (e) {
  console.error(`MCP client failed: ${e?.stack ?? e}`);
  process.exit(1);
}
