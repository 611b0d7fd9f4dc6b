// Parse LogQL queries with Grafana's own grammar (@grafana/lezer-logql, what Grafana's Loki
// editor uses). Reads a JSON array of queries on stdin; writes a JSON array with, for each
// query, the character offsets where the parser had to recover from an error (empty: parses).
import { parser } from "@grafana/lezer-logql";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const errors = JSON.parse(input).map((query) => {
  const found = [];
  parser.parse(query).iterate({
    enter: (node) => {
      if (node.type.isError) found.push(node.from);
    },
  });
  return found;
});
process.stdout.write(JSON.stringify(errors));
