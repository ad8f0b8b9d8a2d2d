// The query service's web page. Plain JavaScript, no build step, nothing from elsewhere.
// Every piece of data goes into the page through textContent (never innerHTML), so
// document text is shown literally. The bearer token lives in sessionStorage (this tab
// only) and travels in the Authorization header, never in a URL.
"use strict";

(function () {
  const STORAGE_KEY = "bergson_ray.token:" + new URL(".", location.href).pathname;
  const api = (path) => new URL(path, location.href).toString();
  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function say(text, kind) {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
    box.hidden = !text;
  }

  const token = {
    get: () => sessionStorage.getItem(STORAGE_KEY),
    set: (value) => sessionStorage.setItem(STORAGE_KEY, value),
    clear: () => sessionStorage.removeItem(STORAGE_KEY),
  };

  const REFUSED =
    "The service refused the access token (HTTP 401): it is missing or wrong. " +
    "Enter the token that `bergson-ray serve --http` printed.";

  class Refused extends Error {}

  async function call(path, body) {
    const value = token.get();
    const headers = { Accept: "application/json" };
    if (value) headers.Authorization = "Bearer " + value;
    const init = { method: body === undefined ? "GET" : "POST", headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(api(path), init);
    } catch (err) {
      throw new Error("Cannot reach the service: " + err.message);
    }
    if (response.status === 401) throw new Refused(REFUSED);
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.error ? data.error : response.statusText;
      throw new Error("The service answered HTTP " + response.status + ": " + detail);
    }
    return data;
  }

  function showConnected(info) {
    $("token-section").hidden = true;
    $("query-section").hidden = false;
    $("service-name").textContent = info && info.name ? info.name : "";
    const parts = [];
    if (info && info.rows !== undefined) parts.push(info.rows + " rows");
    if (info && info.dim !== undefined) parts.push("dim " + info.dim);
    if (info && info.faiss && info.faiss.index_factory) parts.push(info.faiss.index_factory);
    if (info && info.model === false) parts.push("no model: text queries are off");
    $("service-info").textContent = parts.join(" · ");
  }

  function showTokenForm() {
    $("token-section").hidden = false;
    $("query-section").hidden = true;
    $("service-info").textContent = "";
    $("token").value = "";
    $("token").focus();
  }

  function refused(err) {
    token.clear();
    showTokenForm();
    say(err.message, "error");
  }

  async function connect() {
    try {
      const info = await call("info");
      showConnected(info);
      return true;
    } catch (err) {
      if (err instanceof Refused) refused(err);
      else say(err.message, "error");
      return false;
    }
  }

  function formatScore(score) {
    if (typeof score !== "number" || !isFinite(score)) return String(score);
    return score.toPrecision(6);
  }

  function textCell(text) {
    if (text === null || text === undefined) {
      return el("td", {}, [el("span", { className: "none", text: "(no text stored)" })]);
    }
    return el("td", {}, [el("div", { className: "text", text: String(text) })]);
  }

  function renderResults(result) {
    const body = $("results").tBodies[0];
    body.replaceChildren();
    const docIds = result.doc_ids && result.doc_ids.length ? result.doc_ids : result.ids;
    const perToken =
      (result.token_docs || []).length > 0 || docIds.some((doc, j) => doc !== result.ids[j]);
    result.ids.forEach((id, j) => {
      const doc = docIds[j];
      const score = result.scores[j];
      const row = el("tr", { "data-id": String(id), "data-doc": String(doc), "data-score": String(score) }, [
        el("td", { className: "num", text: String(j + 1) }),
        el("td", { className: "num doc", text: String(doc) }),
        el("td", { className: "num id", text: String(id) }),
        el("td", { className: "num score", text: formatScore(score) }),
        textCell(result.texts ? result.texts[j] : null),
      ]);
      body.appendChild(row);
    });
    const direction = result.direction === "bottom" ? "lowest" : "highest";
    const what = perToken
      ? result.ids.length + " tokens (rows of a per-token store) in " + new Set(docIds).size +
        " documents"
      : result.ids.length + " documents";
    $("results-summary").textContent =
      what + " with the " + direction + " scores" + (result.query ? " for: " + result.query : "");
    $("results-section").hidden = false;
  }

  function heatColour(score, scale) {
    if (score === null || scale <= 0) return "";
    const a = Math.sqrt(Math.min(1, Math.abs(score) / scale));  // sqrt: small scores stay visible
    const alpha = (0.06 + 0.84 * a).toFixed(3);
    return score >= 0 ? "rgba(230, 110, 60, " + alpha + ")" : "rgba(60, 110, 220, " + alpha + ")";
  }

  function renderHeat(docs) {
    const box = $("heat");
    box.replaceChildren();
    if (!docs || docs.length === 0) {
      $("heat-section").hidden = true;
      return;
    }
    let scale = 0;
    for (const d of docs) for (const s of d.scores) if (s !== null) scale = Math.max(scale, Math.abs(s));
    for (const d of docs) {
      const hits = new Set(d.hits);
      const line = el("div", { className: "tokens" });
      d.tokens.forEach((tok, t) => {
        const s = d.scores[t];
        const span = el("span", {
          className: "tok" + (hits.has(t) ? " hit" : "") + (s === null ? " none" : ""),
          text: tok,
          title: "token " + (d.start + t) + (s === null ? ": no row (first token)" : ": score " + formatScore(s)),
          "data-score": s === null ? "" : String(s),
        });
        const colour = heatColour(s, scale);
        if (colour) span.style.backgroundColor = colour;  // CSSOM, allowed by the CSP
        line.appendChild(span);
      });
      const last = d.start + d.tokens.length - 1;
      box.appendChild(
        el("div", { className: "heat-doc", "data-doc": String(d.doc_id) }, [
          el("h3", { text: "document " + d.doc_id + " · tokens " + d.start + "–" + last }),
          line,
        ]),
      );
    }
    $("heat-section").hidden = false;
  }

  function readQuery() {
    const mode = document.querySelector('input[name="mode"]:checked').value;
    if (mode === "pair") {
      const prompt = $("query-prompt").value;
      const completion = $("query-completion").value;
      if (!completion.trim()) throw new Error("Type a completion: the loss is taken on it.");
      return [prompt, completion];
    }
    const text = $("query-text").value;
    if (!text.trim()) throw new Error("Type a query text.");
    return text;
  }

  async function search(event) {
    event.preventDefault();
    let query;
    try {
      query = readQuery();
    } catch (err) {
      say(err.message, "error");
      return;
    }
    const k = Number.parseInt($("k").value, 10);
    if (!Number.isInteger(k) || k < 1) {
      say("k must be a whole number of at least 1.", "error");
      return;
    }
    const reverse = $("direction").value === "bottom";
    const button = $("submit");
    button.disabled = true;
    say("Searching…", "ok");
    try {
      const data = await call("query", { queries: [query], k, reverse, tokens: true });
      const result = data.results[0];
      say("", "");
      renderResults(result);
      renderHeat(result.token_docs);
    } catch (err) {
      if (err instanceof Refused) refused(err);
      else say(err.message, "error");
    } finally {
      button.disabled = false;
    }
  }

  function setMode() {
    const pair = document.querySelector('input[name="mode"]:checked').value === "pair";
    $("pair-input").hidden = !pair;
    $("text-input").hidden = pair;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) {
        say("Enter the access token.", "error");
        return;
      }
      token.set(value);
      $("token").value = "";
      if (await connect()) say("Connected.", "ok");
    });
    $("forget").addEventListener("click", () => {
      token.clear();
      $("results-section").hidden = true;
      $("heat-section").hidden = true;
      say("The token is forgotten.", "ok");
      showTokenForm();
    });
    $("query-form").addEventListener("submit", search);
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", setMode);
    }
    setMode();
    if (token.get()) connect();
    else showTokenForm();
  });
})();
