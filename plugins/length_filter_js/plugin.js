// length_filter in JavaScript: the rules of plugins/length_filter_c, for the
// language benchmark (cargo bench -p pt-host --bench plugins).
const SPACES = new Set([" ", "\t", "\n", "\r", "\u3000", "\u00a0"]);

function judge(text) {
  const counts = new Map();
  let chars = 0, top = 0;
  for (const c of text) {
    if (SPACES.has(c)) continue;
    chars++;
    const n = (counts.get(c) || 0) + 1;
    counts.set(c, n);
    if (n > top) top = n;
  }
  if (chars < 10) return "too_short";
  if (chars > 100000) return "too_long";
  if (chars >= 20 && top > 0.5 * chars) return "repeated_character";
  const lines = text.split("\n").filter((l) => l.length > 0);
  if (lines.length >= 3 && lines.length - new Set(lines).size > 0.3 * lines.length) return "duplicate_lines";
  return null;
}

export const plugin = {
  describe() {
    return { id: "length_filter", version: "0.1.0", description: "length_filter (JavaScript, benchmark)", kinds: ["filter"], configSchema: "{}" };
  },
  configure(text) {
    JSON.parse(text);
  },
};

export const filter = {
  filterBatch(docs) {
    return docs.map((d) => {
      const reason = judge(d.text);
      return reason ? { tag: "drop", val: reason } : { tag: "keep" };
    });
  },
};
