const config = { min_chars: 10 };

export const plugin = {
  describe() {
    const schema = { type: "object", additionalProperties: false, properties: { min_chars: { type: "integer", default: 10 } } };
    return { id: "{{name}}", version: "0.1.0", description: "Drops documents shorter than min_chars", kinds: ["filter"], configSchema: JSON.stringify(schema) };
  },
  configure(text) {
    for (const [key, value] of Object.entries(JSON.parse(text))) {
      if (key !== "min_chars" || !Number.isInteger(value)) throw `unknown key or wrong type: \`${key}\``;
      config[key] = value;
    }
  },
};

export const filter = {
  filterBatch(docs) {
    return docs.map((d) =>
      [...d.text].filter((c) => c.trim() !== "").length < config.min_chars ? { tag: "drop", val: "too_short" } : { tag: "keep" }
    );
  },
};
