// markdown_strip: a pt-host mapper written in JavaScript (componentize-js).
// Turns Markdown and HTML into the plain text a language model should see:
// tags, comments, scripts and styles removed, common entities decoded, and
// Markdown syntax (headings, emphasis, code marks, links, images, list and
// quote markers) reduced to its text. Documents it does not change come back
// as `unchanged`.

const SCHEMA = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  title: "markdown_strip configuration",
  type: "object",
  additionalProperties: false,
  properties: {
    html: { type: "boolean", default: true },
    markdown: { type: "boolean", default: true },
  },
};

const config = { html: true, markdown: true };

const ENTITIES = { "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&nbsp;": " " };

function stripHtml(text) {
  return text
    .replace(/<!--[\s\S]*?-->/g, "")
    .replace(/<(script|style)[^>]*>[\s\S]*?<\/\1>/gi, "")
    .replace(/<br\s*\/?>/gi, "\n")
    .replace(/<\/?[a-zA-Z][^>]*>/g, "")
    .replace(/&(amp|lt|gt|quot|#39|nbsp);/g, (e) => ENTITIES[e]);
}

function stripMarkdown(text) {
  return text
    .split("\n")
    .map((line) =>
      line
        .replace(/^\s{0,3}#{1,6}\s+/, "")
        .replace(/^\s{0,3}>\s?/, "")
        .replace(/^\s*(?:[-*+]|\d+[.)])\s+/, "")
        .replace(/!\[([^\]]*)\]\([^)]*\)/g, "$1")
        .replace(/\[([^\]]+)\]\([^)]*\)/g, "$1")
        .replace(/(\*\*|__)(.+?)\1/g, "$2")
        .replace(/(\*|_)([^*_\s][^*_]*?)\1/g, "$2")
        .replace(/`([^`]+)`/g, "$1")
    )
    .join("\n");
}

export const plugin = {
  describe() {
    return {
      id: "markdown_strip",
      version: "0.1.0",
      description: "Strips HTML and Markdown syntax down to plain text (JavaScript)",
      kinds: ["mapper"],
      configSchema: JSON.stringify(SCHEMA),
    };
  },
  configure(text) {
    let given;
    try {
      given = JSON.parse(text);
    } catch (e) {
      throw `configuration is not JSON: ${e}`;
    }
    if (given === null || typeof given !== "object" || Array.isArray(given)) {
      throw "configuration must be a JSON object";
    }
    for (const [key, value] of Object.entries(given)) {
      if (!(key in config)) throw `unknown key \`${key}\` (known: html, markdown)`;
      if (typeof value !== "boolean") throw `\`${key}\` must be true or false`;
      config[key] = value;
    }
  },
};

export const mapper = {
  mapBatch(docs) {
    return docs.map((doc) => {
      let text = doc.text;
      if (config.html) text = stripHtml(text);
      if (config.markdown) text = stripMarkdown(text);
      return text === doc.text ? { tag: "unchanged" } : { tag: "replace", val: text };
    });
  },
};
