// Parley's browser client: plain modern JavaScript, no build step, no dependencies.
// One WebSocket carries every stream (protocol/PROTOCOL.md); REST does the rest. Every text
// from the server goes into the page as textContent, never as HTML.

const $ = (id) => document.getElementById(id);
const SLIDERS = ["warmth", "humor", "formality", "verbosity", "curiosity"];
const LANGUAGES = [["en", "English"], ["es", "Español"], ["fr", "Français"], ["de", "Deutsch"], ["pt-BR", "Português (Brasil)"],
                   ["it", "Italiano"], ["ja", "日本語"], ["zh-Hans", "中文（简体）"]];
const REASONS = { cancelled: "stopped", insufficient_credits: "out of credits", spend_limit: "your spending limit was reached", error: "the reply failed", shutdown: "the server restarted", interrupted: "cut short: the server stopped" };

const state = {
  token: sessionStorage.getItem("parley.token"),
  user: null,
  clones: [],
  cloneId: null,         // the clone chatted with
  conversationId: null,  // the conversation shown
  editingClone: null,
  streams: new Map(),    // stream id → { el, seq, conversation, room, ended }
  pending: new Map(),    // request id → what to do with its answer or error
  deliveries: new Set(), // schedule ids already shown (delivery is at least once)
  room: null,            // { room, members } of the room joined
  nextId: 1,
  sending: new Map(),    // chat.send request id → { el, text, conversation } until the server takes it
  welcomed: false,       // the socket is open and the server said welcome
  reloadOnWelcome: false,
  restoreRoom: null,     // a room the URL named, joined once connected
  speak: false,          // the open conversation's replies are asked with "voice": true (see speakingIn)
  greeting: 0,           // which of the clone's greetings opens the next new conversation
};

// ---------- REST ----------

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error(json?.error ? humanError(json.error) : `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.code = json?.error?.code;
    throw error;
  }
  return json;
}

// ---------- the socket ----------

const socket = {
  ws: null,
  attempts: 0,
  stopped: false,

  connect() {
    this.stopped = false;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // Joined tokens: under load a frame may carry several tokens of a stream (`onToken` appends
    // the text and keeps the last seq either way).
    const ws = new WebSocket(`${scheme}://${location.host}/v1/ws?coalesce=tokens&token=${encodeURIComponent(state.token)}`);
    this.ws = ws;
    ws.binaryType = "arraybuffer";  // a voiced reply's audio (PROTOCOL.md, Voice)
    setConnection("connecting…");
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") { heardFromServer(); onAudio(event.data); return; }
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      heardFromServer();
      onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws || this.stopped) return;
      this.ws = null;
      unconfirmedSendsBack();
      updateComposer();
      if (event.code === 1008 && /token|expired|sockets|deleted/i.test(event.reason)) {
        setConnection("disconnected");
        showBanner(`Disconnected: ${event.reason}`);
        return;
      }
      // Anything else (a network drop, a restart, a slow-reader cut-off) reconnects and resumes.
      const delay = Math.min(10_000, 250 * 2 ** this.attempts++);
      setConnection("reconnecting…");
      setTimeout(() => { if (!this.stopped) this.connect(); }, delay);
    };
  },

  get isOpen() { return this.ws?.readyState === WebSocket.OPEN && state.welcomed; },

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      showBanner("Not connected yet; try again in a moment.", "connection");
      return false;
    }
    this.ws.send(JSON.stringify(frame));
    return true;
  },

  close() {
    this.stopped = true;
    this.ws?.close(1000, "signed out");
    this.ws = null;
  },
};

function request(frame, handler = {}) {
  const id = `w${state.nextId++}`;
  state.pending.set(id, handler);
  if (!socket.send({ ...frame, id })) state.pending.delete(id);
  return id;
}

function onWelcome() {
  socket.attempts = 0;
  state.welcomed = true;
  setConnection("connected");
  hideBanner("connection");
  updateComposer();
  // A message whose answer the drop cut off may have been stored: the conversation shows it if so.
  if (state.conversationId && state.reloadOnWelcome) showConversation(state.conversationId);
  state.reloadOnWelcome = false;
  // Streams cut by the drop: the server replays what came after the last token shown.
  for (const [stream, s] of state.streams) {
    if (!s.ended && !s.room) request({ type: "stream.resume", stream, after: s.seq, audio_after: s.chunk ?? 0 }, { stream });
  }
  // A room is joined again: its state replaces the view, in-flight turns replay from the start.
  if (state.room) joinRoom(state.room.room.id, state.room.language);
  else if (state.restoreRoom) joinRoom(state.restoreRoom);
  state.restoreRoom = null;
}

function onFrame(frame) {
  const handler = frame.ref ? state.pending.get(frame.ref) : undefined;
  if (frame.ref && frame.type !== "stream.start") state.pending.delete(frame.ref);
  switch (frame.type) {
    case "welcome": return onWelcome();
    case "stream.start": return onStreamStart(frame);
    case "token": return onToken(frame);
    case "stream.end": return onStreamEnd(frame);
    case "paywall": return onPaywall(frame);
    case "error": return onError(frame, handler);
    case "delivery": return onDelivery(frame);
    case "conversation.title": return loadConversations();
    case "schedule.ok":
      if (handler?.schedule) $("schedule-status").textContent = "Scheduled.";
      return loadSchedules();
    case "schedule.cancelled": case "schedule.failed": return loadSchedules();
    case "room.state": return onRoomState(frame, handler);
    case "room.event": return onRoomEvent(frame);
  }
}

// ---------- chat streams ----------

function onStreamStart(frame) {
  if (frame.ref) accepted(frame.ref, frame.parent);
  let s = state.streams.get(frame.stream);
  if (s) {  // the answer to a resume: the bubble is already there
    state.pending.delete(frame.ref);
    s.el.setAttribute("aria-busy", "true");
    return;
  }
  if (frame.room) {
    if (!state.room || frame.room !== state.room.room.id) return;
    const who = frame.clone ? cloneName(frame.clone) : frame.user ?? "";
    const el = addBubble($("room-log"), { who: frame.lang ? `${who} (${frame.lang})` : who, text: "", kind: "clone", model: frame.model, markdown: true });
    if (frame.clone) markDebater(el, frame.clone);
    s = { el, seq: 0, room: frame.room };
  } else {
    if (frame.conversation !== state.conversationId) {
      // A reply to a message just sent without a conversation starts one.
      if (!(frame.ref && state.pending.get(frame.ref)?.newConversation)) return;
      state.conversationId = frame.conversation;
      setSpeak(state.speak);  // the choice made before it had an id is now its own
      setRoute(`#/c/${frame.conversation}`);
      loadConversations();
    }
    const reload = frame.ref && state.pending.get(frame.ref)?.reload;
    state.pending.delete(frame.ref);
    const el = addBubble($("messages"), { who: cloneName(frame.clone), text: "", kind: "assistant", model: frame.model, markdown: true });
    s = { el, seq: 0, conversation: frame.conversation, reload };
  }
  s.el.dataset.stream = frame.stream;
  s.el.setAttribute("aria-busy", "true");
  state.streams.set(frame.stream, s);
  updateComposer();
  updateRoomControls();
}

function onToken(frame) {
  const s = state.streams.get(frame.stream);
  if (!s || frame.seq <= s.seq) return;  // not shown here, or already shown (a replay)
  s.el.querySelector(".text").textContent += frame.text;
  s.seq = frame.seq;
  s.el.dataset.seq = String(frame.seq);
  // A conversation switched away from keeps its bubble off the page: nothing to scroll.
  const list = s.el.parentElement;
  if (list) list.scrollTop = list.scrollHeight;
}

function onStreamEnd(frame) {
  if (typeof frame.balance === "number") setCredits(frame.balance);
  const s = state.streams.get(frame.stream);
  if (!s) return;
  s.ended = true;
  s.el.setAttribute("aria-busy", "false");
  // Streamed as plain text; once whole, a reply is shown as the Markdown it is.
  const body = s.el.querySelector(".text");
  s.el.dataset.raw = body.textContent;
  if (!s.el.classList.contains("user")) renderMarkdown(body, body.textContent);
  s.el.dataset.reason = frame.reason;
  if (frame.message) s.el.dataset[s.room ? "entry" : "message"] = frame.message;
  if (REASONS[frame.reason]) addNote(s.el, REASONS[frame.reason]);
  state.streams.delete(frame.stream);
  updateComposer();
  updateRoomControls();
  if (s.room || s.conversation !== state.conversationId) return;
  // A regenerated or edited branch: the path changed, and its alternatives with it.
  if (s.reload) showConversation(s.conversation);
  else if (frame.message) addMissingActions(s.conversation);
}

function onPaywall(frame) {
  setCredits(frame.balance);
  showBanner(`You are out of credits: the reply stopped. You have ${credits(frame.balance)}; the next words need ${credits(frame.required)}.`);
}

function onError(frame, handler) {
  if (frame.ref && state.sending.has(frame.ref)) return notSent(frame.ref, humanError(frame));
  if (handler?.schedule) { $("schedule-status").textContent = `Not scheduled: ${humanError(frame)}`; return; }
  // A refused regenerate or edit: the messages hidden for it come back.
  if (handler?.reload && state.conversationId) showConversation(state.conversationId);
  if (handler?.stream && frame.code === "stream_gone") {
    // Too late to resume: the stored message is the truth.
    state.streams.delete(handler.stream);
    if (state.conversationId) showConversation(state.conversationId);
    return;
  }
  if (frame.code === "insufficient_credits" && typeof frame.balance === "number") setCredits(frame.balance);
  showBanner(humanError(frame));
}

// Server errors in words for people: by code where the code says it all, otherwise the server's
// sentence with its ids (cv_…, rm_…) replaced by what they name.
const NOUNS = { cv: "conversation", msg: "message", cl: "clone", rm: "room", st: "reply", sch: "schedule", re: "entry" };
function humanError(frame) {
  const message = frame.message ?? "";
  if (frame.code === "insufficient_credits") {
    return `Not enough credits: you have ${credits(frame.balance ?? 0)}, this needs ${frame.required ? credits(frame.required) : "more"}.`;
  }
  if (frame.code === "spend_limit") return "Your spending limit is reached for now; raise it or wait for the next day or month.";
  if (frame.code === "plan_required") return frame.plan ? `Your plan does not include this; the ${frame.plan} plan does.` : "Your plan does not include this.";
  if (frame.code === "rate_limited" && /already streaming/.test(message)) return "A reply is still being written in this conversation; wait for it or press Stop.";
  if (frame.code === "internal") return "Something went wrong on the server; try again.";
  const words = message
    .replace(/\b(conversation|message|clone|room|stream|reply|schedule|entry) (?:cv|msg|cl|rm|st|sch|re)_[0-9A-Za-z]+/g, "this $1")
    .replace(/\b(cv|msg|cl|rm|st|sch|re)_[0-9A-Za-z]+/g, (_, prefix) => `this ${NOUNS[prefix]}`);
  return words ? words[0].toUpperCase() + words.slice(1) + (/[.!?]$/.test(words) ? "" : ".") : "The server refused that.";
}

function credits(n) { return `${n} credit${n === 1 ? "" : "s"}`; }

// ---------- views ----------

function show(view) {
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page"); else button.removeAttribute("aria-current");
  }
  $(`${view}-title`).focus();
  if (view === "schedules") loadSchedules();
  if (view === "rooms") loadMyRooms();
  if (view === "chat" && !state.conversationId) showConversation(null);  // the current clone's greeting
  if (view === "account") { $("account-status").textContent = ""; loadPlan(); loadCreditHistory(); }
}

function setConnection(text) { $("connection").textContent = text; }
// Below this the header warns, once per drop below it: about two replies at the default prices.
const LOW_BALANCE = 500;

function setCredits(balance) {
  $("credits").textContent = credits(balance);
  $("credits").dataset.balance = String(balance);
  const low = balance < LOW_BALANCE;
  $("credits").classList.toggle("low", low);
  if (low && !state.warnedLow) showBanner(`Your balance is low: ${credits(balance)} left. Replies stop when it runs out.`, "credits");
  if (!low) hideBanner("credits");
  state.warnedLow = low;
}

// The Account view's plan: what it includes, the period, the user's own spending limits and
// what this month cost, day by day (all from the server: GET /v1/me and /v1/me/usage).
const PLAN_FEATURES = { chat: "chat", debate: "debates", translation: "translation chats", schedule: "scheduled messages", voice: "voice" };
async function loadPlan() {
  try {
    const [me, usage] = await Promise.all([api("GET", "/v1/me"), api("GET", "/v1/me/usage?by=day")]);
    const plan = me.plan;
    const last = new Date(Date.parse(me.period.end) - 1).toLocaleDateString(undefined, { timeZone: "UTC" });  // the end is exclusive
    const allowance = plan.monthly_credits > 0
      ? ` ${credits(plan.monthly_credits)} a month (${plan.renewal === "add" ? "added" : "topped up to"} on the month's first use).` : "";
    const status = me.subscription && me.subscription.status !== "active"
      ? ` Your subscription is ${me.subscription.status === "past_due" ? "past due" : "cancelled"}: it ends ${new Date(me.subscription.period_end).toLocaleDateString()}.` : "";
    $("plan-summary").textContent = `${plan.name} plan: ${plan.features.map((f) => PLAN_FEATURES[f] ?? f).join(", ")}.${allowance}${status} This month runs to ${last}.`;
    showLoaded("persona-name", me.persona?.name ?? "");
    showLoaded("persona-description", me.persona?.description ?? "");
    showLoaded("limit-daily", me.limits.daily ?? "");
    showLoaded("limit-monthly", me.limits.monthly ?? "");
    $("usage-days").replaceChildren(...(usage.groups.length ? usage.groups : [{ key: null, credits: 0 }]).map((g) => {
      const li = document.createElement("li");
      li.textContent = g.key ? `${new Date(g.key + "T00:00:00Z").toLocaleDateString(undefined, { timeZone: "UTC" })}: ${credits(g.credits)}` : "Nothing spent yet this month.";
      return li;
    }));
  } catch (error) {
    $("plan-summary").textContent = `Could not load your plan: ${error.message}`;
  }
}

// A field's value as the server has it, unless the user changed it since it was last shown
// (they may type before GET /v1/me answers: their words stay).
function showLoaded(id, value) {
  const field = $(id);
  if (field.value === (field.dataset.loaded ?? "")) field.value = String(value);
  field.dataset.loaded = String(value);
}

// A field showing what the server now has, just saved.
function showSaved(id, value) {
  $(id).value = value;
  $(id).dataset.loaded = value;
}

async function saveLimits(event) {
  event.preventDefault();
  const value = (id) => $(id).value.trim() === "" ? null : Number($(id).value);
  try {
    const saved = await api("PUT", "/v1/me/limits", { daily: value("limit-daily"), monthly: value("limit-monthly") });
    for (const [id, value] of [["limit-daily", saved.daily], ["limit-monthly", saved.monthly]]) $(id).dataset.loaded = String(value ?? "");
    $("limits-status").textContent = saved.daily === null && saved.monthly === null ? "Saved: no limits." : "Saved.";
  } catch (error) {
    $("limits-status").textContent = `Not saved: ${error.message}`;
  }
}

// Who the user is to their clones (PUT /v1/me/persona); an empty name removes it ("User" again).
// The clones are read again: their greetings name the user.
async function savePersona(event) {
  event.preventDefault();
  const name = $("persona-name").value.trim();
  try {
    if (name === "") {
      await api("DELETE", "/v1/me/persona");
      showSaved("persona-name", "");
      showSaved("persona-description", "");
      $("persona-status").textContent = "Saved: your clones call you User.";
    } else {
      const saved = await api("PUT", "/v1/me/persona", { name, description: $("persona-description").value });
      showSaved("persona-name", saved.name);
      showSaved("persona-description", saved.description);
      $("persona-status").textContent = `Saved: your clones call you ${saved.name}.`;
    }
    await loadClones();
  } catch (error) {
    $("persona-status").textContent = `Not saved: ${error.message}`;
  }
}

// The Account view's ledger: the newest entries, and what each conversation or room cost in them.
const FEATURES = { chat: "chat reply", debate: "debate turn", translation: "translation", scheduled: "scheduled message",
                   title: "conversation title", summary: "conversation summary" };
async function loadCreditHistory() {
  try {
    const [page, conversations] = await Promise.all([api("GET", "/v1/credits?limit=100"), api("GET", "/v1/conversations?limit=100")]);
    setCredits(page.balance);
    const titles = new Map(conversations.conversations.map((c) => [c.id, c.title || "Untitled"]));
    const what = (e) => e.kind === "grant" ? (e.note || "credits added")
      : `${FEATURES[e.feature] ?? e.feature ?? "usage"}${e.conversation ? ` in “${titles.get(e.conversation) ?? "a deleted conversation"}”` : e.room ? " in a room" : ""}`;
    $("credit-summary").textContent = `Balance: ${credits(page.balance)}. The last ${page.entries.length} ledger entries below.`;
    const spent = new Map();
    for (const e of page.entries) {
      if (e.kind === "grant" || !(e.conversation || e.room)) continue;  // a settlement gives back what was not used
      const key = e.conversation ? `“${titles.get(e.conversation) ?? "a deleted conversation"}”` : "a debate or translation room";
      spent.set(key, (spent.get(key) ?? 0) - e.credits);
    }
    $("credit-costs").replaceChildren(...[...spent].sort((a, b) => b[1] - a[1]).map(([key, total]) => {
      const li = document.createElement("li");
      li.textContent = `${key}: ${credits(total)}`;
      return li;
    }));
    $("credit-history").tBodies[0].replaceChildren(...page.entries.map((e) => {
      const tr = document.createElement("tr");
      for (const cell of [new Date(e.created_at).toLocaleString(), what(e), String(e.tokens), (e.credits > 0 ? "+" : "") + e.credits]) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.append(td);
      }
      return tr;
    }));
  } catch (error) {
    $("credit-summary").textContent = `Could not load your credits: ${error.message}`;
  }
}

// One banner for what has no place of its own; `cause` lets what ends that cause clear it.
function showBanner(text, cause = "") {
  $("banner-text").textContent = text;
  $("banner").dataset.cause = cause;
  $("banner").hidden = false;
}

function hideBanner(cause) {
  if (cause === undefined || $("banner").dataset.cause === cause) $("banner").hidden = true;
}

// ---------- the composer: a message is shown as sent once the server took it ----------

// Whether a reply streams (or a message waits for its answer) in the open conversation.
function busyHere() {
  const here = state.conversationId ?? null;
  return [...state.streams.values()].some((s) => !s.room && !s.ended && s.conversation === here)
    || [...state.sending.values()].some((p) => p.conversation === here);
}

function updateComposer() {
  const streaming = [...state.streams.values()].some((s) => !s.room && !s.ended && s.conversation === (state.conversationId ?? null));
  // Send becomes Stop while a reply streams here: one button in one place, on a phone too.
  $("stop").hidden = !streaming;
  $("send").hidden = streaming;
  $("send").disabled = !socket.isOpen || busyHere() || !state.cloneId;
  $("composer-status").textContent = !socket.isOpen ? "Not connected: what you write stays here until it can be sent."
    : streaming ? "A reply is being written (Esc stops it)." : "";
}

function accepted(ref, message) {
  const pending = state.sending.get(ref);
  if (!pending) return;
  state.sending.delete(ref);
  if (message) pending.el.dataset.message = message;  // the reply's parent: the message sent
  pending.el.classList.remove("pending");
  pending.el.querySelector(".note")?.remove();
  updateComposer();
}

function notSent(ref, why) {
  const pending = state.sending.get(ref);
  state.sending.delete(ref);
  updateComposer();
  if (!pending) return;
  const { el, text } = pending;
  el.classList.remove("pending");
  el.classList.add("failed");
  el.querySelector(".note")?.remove();
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = `not sent · ${why} `;
  const retry = actionButton("Retry", "Send this message again", () => {
    el.remove();
    $("chat-text").value = text;
    $("chat-form").requestSubmit();
  });
  note.append(retry);
  el.append(note);
}

// The socket closed before the server answered a send: the text goes back to the box (unless
// something else is there), and the conversation is read again once connected, which shows the
// message if the server had stored it after all.
function unconfirmedSendsBack() {
  state.welcomed = false;
  for (const [ref, pending] of state.sending) {
    state.sending.delete(ref);
    state.pending.delete(ref);
    pending.el.remove();
    if (!$("chat-text").value.trim()) $("chat-text").value = pending.text;
    state.reloadOnWelcome = true;
  }
}

// Frames that stop arriving while a reply streams, with the socket still open, mean the network
// stalled (a closed socket says so itself): the header says so until frames come again.
let stallTimer = null;
function heardFromServer() {
  clearTimeout(stallTimer);
  if ($("connection").dataset.stalled) { delete $("connection").dataset.stalled; setConnection(navigator.onLine ? "connected" : "offline"); }
  if ([...state.streams.values()].some((s) => !s.ended)) stallTimer = setTimeout(stalled, 3000);
}

function stalled() {
  if (!socket.isOpen || ![...state.streams.values()].some((s) => !s.ended)) return;
  $("connection").dataset.stalled = "1";
  setConnection("waiting for the network…");
}

// ---------- Markdown, built as elements ----------
// A reply's Markdown (paragraphs, headings, lists, quotes, fenced code, inline code, bold,
// italic, links) is built with DOM calls only: the model's text is only ever a text node, so no
// markup in it runs. Links are http(s) or mailto only and open without a referrer or opener.

function renderMarkdown(container, text) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^\s*```\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      container.append(codeBlock(code.join("\n"), fence[1]));
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      const h = document.createElement("p");
      h.className = `heading h${heading[1].length}`;
      inline(h, heading[2]);
      container.append(h);
      i++;
      continue;
    }
    const listKind = /^\s*([-*+]|\d+[.)])\s+/.exec(line);
    if (listKind) {
      const ordered = /\d/.test(listKind[1]);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const item = (ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/).exec(lines[i]);
        if (!item) break;
        const li = document.createElement("li");
        inline(li, item[1]);
        list.append(li);
        i++;
      }
      container.append(list);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const quote = document.createElement("blockquote");
      const quoted = [];
      for (; i < lines.length && /^>\s?/.test(lines[i]); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      inline(quote, quoted.join("\n"));
      container.append(quote);
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !/^\s*```/.test(lines[i]) && !/^(#{1,6})\s/.test(lines[i])
      && !/^\s*([-*+]|\d+[.)])\s+/.test(lines[i]) && !/^>/.test(lines[i]); i++) paragraph.push(lines[i]);
    const p = document.createElement("p");
    inline(p, paragraph.join("\n"));
    container.append(p);
  }
}

function codeBlock(code, language) {
  const pre = document.createElement("pre");
  const element = document.createElement("code");
  if (language) element.dataset.language = language;
  element.textContent = code;
  const copy = actionButton("Copy", "Copy this code", () => copyText(code, copy));
  copy.className = "copy";
  pre.append(copy, element);
  return pre;
}

function copyText(text, button) {
  const label = button.dataset.label ?? button.textContent;
  button.dataset.label = label;
  const say = (what) => { button.textContent = what; setTimeout(() => { button.textContent = label; }, 1500); };
  if (!navigator.clipboard) return say("Copy failed");
  navigator.clipboard.writeText(text).then(() => say("Copied"), () => say("Copy failed"));
}

// Inline marks: `code`, **bold**, *italic* or _italic_, [label](url), bare http(s) links.
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*|\b_[^_\n]+_\b)|(\[[^\]\n]+\]\([^)\s]+\))|(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/;
function inline(parent, text) {
  let rest = text;
  while (rest) {
    const match = INLINE.exec(rest);
    if (!match) { parent.append(document.createTextNode(rest)); return; }
    if (match.index) parent.append(document.createTextNode(rest.slice(0, match.index)));
    const [whole, code, bold, italic, link, url] = match;
    if (code) {
      const el = document.createElement("code");
      el.textContent = code.slice(1, -1);
      parent.append(el);
    } else if (bold || italic) {
      const el = document.createElement(bold ? "strong" : "em");
      inline(el, whole.slice(bold ? 2 : 1, bold ? -2 : -1));
      parent.append(el);
    } else {
      const [label, href] = link ? [link.slice(1, link.indexOf("](")), link.slice(link.indexOf("](") + 2, -1)] : [url, url];
      parent.append(safeLink(label, href));
    }
    rest = rest.slice(match.index + whole.length);
  }
}

function safeLink(label, href) {
  let url = null;
  try { url = new URL(href); } catch { /* not a URL: shown as text */ }
  if (!url || !["http:", "https:", "mailto:"].includes(url.protocol)) return document.createTextNode(label === href ? href : `${label} (${href})`);
  const a = document.createElement("a");
  a.href = url.href;
  a.textContent = label;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

// The time a message was written, shown beside its author (drawn by CSS from data attributes, so
// the bubble's text stays the message's), and the author's initial as an avatar.
const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
function addBubble(list, { who, text, kind, model, markdown, at }) {
  const li = document.createElement("li");
  li.className = `msg ${kind}`;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who;
  name.dataset.initial = (who || "?").trim().charAt(0).toUpperCase();
  const when = at === undefined ? new Date() : new Date(at);
  if (!Number.isNaN(when.getTime())) {
    name.dataset.time = TIME.format(when);
    name.title = when.toLocaleString();
  }
  const body = document.createElement(markdown ? "div" : "span");
  body.className = "text";
  if (markdown) renderMarkdown(body, text); else body.textContent = text;
  li.append(name, body);
  if (model) {  // which model wrote a reply, under it
    const label = document.createElement("span");
    label.className = "model";
    label.textContent = model;
    label.title = "The model that wrote this reply";
    li.append(label);
  }
  list.append(li);
  list.scrollTop = list.scrollHeight;
  return li;
}

function addNote(el, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  el.append(note);
}

function addEvent(list, text) {
  const li = document.createElement("li");
  li.className = "msg event";
  li.textContent = text;
  list.append(li);
}

function cloneName(id) {
  return state.clones.find((c) => c.id === id)?.name ?? state.room?.room.clones?.find((c) => c.clone === id)?.name ?? "clone";
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value, false, value === selected)));
}

// ---------- clones ----------

// Which model answers the chosen clone: its own, or the server's default.
const MODEL_HOSTS = { local: "runs on this server", simulated: "a stand-in that writes placeholder text, not a language model",
                      openai: "through an OpenAI-compatible service", anthropic: "through Anthropic" };

function showModel() {
  const clone = state.clones.find((c) => c.id === state.cloneId);
  const model = clone?.model ?? state.info?.model;
  const host = !clone?.model || clone.model === state.info?.model ? MODEL_HOSTS[state.info?.model_host] : null;
  $("chat-model").textContent = model ? `Replies come from ${model}${host ? ` (${host})` : ""}.` : "";
}

async function loadClones() {
  state.clones = (await api("GET", "/v1/clones")).clones;
  const options = state.clones.map((c) => [c.id, c.name]);
  if (!state.cloneId || !state.clones.some((c) => c.id === state.cloneId)) state.cloneId = state.clones[0]?.id ?? null;
  fillSelect($("chat-clone"), options, state.cloneId);
  showModel();
  fillSelect($("schedule-clone"), options, state.cloneId);
  const list = $("clone-list");
  list.replaceChildren(...state.clones.map((c) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = c.name;
    if (state.editingClone?.id === c.id) button.setAttribute("aria-current", "true");
    button.onclick = () => editClone(c);
    li.append(button);
    return li;
  }));
  renderDebaters();
  // With no clone, every picker is empty: the views say so and lead to the form that makes one.
  $("no-clones").hidden = state.clones.length > 0;
  updateComposer();
}

function renderSliders(values = {}) {
  const names = [...new Set([...SLIDERS, ...Object.keys(values)])];
  $("sliders").replaceChildren(...names.map((name) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "range"; input.min = "0"; input.max = "100"; input.name = name;
    input.value = String(values[name] ?? 50);
    const out = document.createElement("output");
    out.textContent = input.value;
    input.oninput = () => { out.textContent = input.value; };
    label.append(name, input, out);
    return label;
  }));
}

function editClone(clone) {
  state.editingClone = clone;
  $("clone-form-title").textContent = clone ? `Edit ${clone.name}` : "New clone";
  $("clone-name").value = clone?.name ?? "";
  $("clone-traits").value = (clone?.traits ?? []).join(", ");
  $("clone-prompt").value = clone?.system_prompt ?? "";
  $("clone-memory").value = (clone?.memory ?? []).join("\n");
  $("clone-greeting").value = clone?.profile?.first_mes ?? "";
  renderSliders(clone?.sliders ?? {});
  $("save-clone").textContent = clone ? "Save changes" : "Create clone";
  $("delete-clone").hidden = !clone;
  $("clone-status").textContent = "";
  loadClones();
  $("clone-name").focus();
}

async function saveClone(event) {
  event.preventDefault();
  const sliders = {};
  for (const input of $("sliders").querySelectorAll("input")) sliders[input.name] = Number(input.value);
  const body = {
    name: $("clone-name").value.trim(),
    traits: $("clone-traits").value.split(",").map((t) => t.trim()).filter(Boolean),
    system_prompt: $("clone-prompt").value,
    sliders,
    memory: $("clone-memory").value.split("\n").map((m) => m.trim()).filter(Boolean),
    profile: { first_mes: $("clone-greeting").value.trim() },
  };
  try {
    const saved = state.editingClone
      ? await api("PATCH", `/v1/clones/${state.editingClone.id}`, body)
      : await api("POST", "/v1/clones", body);
    state.editingClone = saved;
    if (!state.cloneId) state.cloneId = saved.id;
    await loadClones();
    editClone(saved);
    $("clone-status").textContent = `Saved ${saved.name}.`;
    $("clone-status").scrollIntoView({ block: "nearest" });
  } catch (error) {
    $("clone-status").textContent = `Could not save: ${error.message}`;
  }
}

async function deleteClone() {
  const clone = state.editingClone;
  if (!clone || !confirm(`Delete ${clone.name} and all its conversations?`)) return;
  try {
    await api("DELETE", `/v1/clones/${clone.id}`);
    if (state.cloneId === clone.id) { state.cloneId = null; state.conversationId = null; }
    editClone(null);
    $("clone-status").textContent = `Deleted ${clone.name}.`;
    await loadClones();
    await loadConversations();
  } catch (error) {
    $("clone-status").textContent = `Could not delete: ${error.message}`;
  }
}

// ---------- conversations ----------

async function loadConversations() {
  const page = await api("GET", "/v1/conversations?limit=100");
  const mine = page.conversations.filter((c) => c.clone === state.cloneId);
  $("conversations").replaceChildren(...mine.map((c) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = c.title || "Untitled";
    if (c.id === state.conversationId) button.setAttribute("aria-current", "true");
    button.onclick = () => showConversation(c.id);
    li.append(button);
    return li;
  }));
}

// ---------- search ----------

// GET /v1/search: each hit shows its conversation's title and a snippet whose matching words are
// marked (built as elements, never parsed as HTML). Opening a hit brings its branch onto the path
// when it is an alternative off it, then shows the message.
async function search(event) {
  event.preventDefault();
  const q = $("search-text").value.trim();
  const results = $("search-results");
  results.replaceChildren();
  if (!q) { $("search-status").textContent = ""; return; }
  try {
    const page = await api("GET", `/v1/search?limit=20&q=${encodeURIComponent(q)}`);
    $("search-status").textContent = page.items.length ? "" : `Nothing found for “${q}”.`;
    results.replaceChildren(...page.items.map((hit) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const title = document.createElement("strong");
      title.textContent = hit.conversation.title || "Untitled";
      const snippet = document.createElement("span");
      snippet.className = "snippet";
      for (const run of hit.snippet) {
        const part = document.createElement(run.match ? "mark" : "span");
        part.textContent = run.text;
        snippet.append(part);
      }
      button.append(title, snippet);
      button.onclick = () => openHit(hit);
      li.append(button);
      return li;
    }));
  } catch (error) {
    $("search-status").textContent = `Could not search: ${error.message}`;
  }
}

async function openHit(hit) {
  const conversation = hit.conversation;
  if (conversation.clone !== state.cloneId && state.clones.some((c) => c.id === conversation.clone)) {
    state.cloneId = conversation.clone;
    $("chat-clone").value = conversation.clone;
    showModel();
  }
  if (hit.message && !hit.message.on_path) {
    await api("POST", `/v1/conversations/${conversation.id}/active`, { message: hit.message.id });
  }
  await showConversation(conversation.id);
  const found = hit.message && document.querySelector(`#messages li[data-message="${hit.message.id}"]`);
  if (found) {
    found.classList.add("found");
    found.scrollIntoView({ block: "center" });
  }
}

// The URL names the open view (#/c/<conversation>, #/r/<room>), so a reload comes back to it.
function setRoute(route) {
  if (location.hash !== route) history.replaceState(null, "", route || location.pathname);
}

async function showConversation(id) {
  state.conversationId = id;
  showSpeak();
  setRoute(id ? `#/c/${id}` : "");
  updateComposer();
  $("conversation-actions").hidden = !id;
  const list = $("messages");
  list.replaceChildren();
  loadConversations();
  if (!id) {
    // A card's greeting opens every new conversation (the server stores it with the first
    // message); with alternate greetings, arrows choose the one it opens with.
    const clone = state.clones.find((c) => c.id === state.cloneId);
    state.greeting = 0;
    if (clone) showGreeting(list, clone);
    return;
  }
  const [page, conversation] = await Promise.all([
    api("GET", `/v1/conversations/${id}/messages?limit=200`), api("GET", `/v1/conversations/${id}`),
  ]);
  if (state.conversationId !== id) return;
  renderPath(id, page);
  attachLive(conversation);
}

// A reply still being written that this page has not seen (it was reloaded, or opened the
// conversation elsewhere): shown from its first token, resumed now or once connected.
function attachLive(conversation) {
  const live = conversation.streaming;
  if (!live || state.streams.has(live.stream)) return;
  const el = addBubble($("messages"), { who: cloneName(conversation.clone), text: "", kind: "assistant", markdown: true });
  el.dataset.stream = live.stream;
  el.setAttribute("aria-busy", "true");
  state.streams.set(live.stream, { el, seq: 0, conversation: conversation.id });
  if (socket.isOpen) request({ type: "stream.resume", stream: live.stream, after: 0 }, { stream: live.stream });
  updateComposer();
}

// The conversation's path: each message with its actions (keep, regenerate or edit, and the
// arrows between its alternatives).
function renderPath(id, page) {
  const list = $("messages");
  const streaming = new Set([...state.streams.keys()]);
  list.replaceChildren();
  const roles = new Map(page.messages.map((m) => [m.id, m.role]));
  for (const m of page.messages) {
    if (m.stream && streaming.has(m.stream)) continue;
    const el = addBubble(list, {
      who: m.role === "user" ? state.user : cloneName(state.cloneId), text: m.text, kind: m.role, markdown: m.role === "assistant", at: m.created_at,
    });
    el.dataset.raw = m.text;
    el.dataset.message = m.id;
    if (m.reason) el.dataset.reason = m.reason;
    if (REASONS[m.reason]) addNote(el, REASONS[m.reason]);
    el.append(messageActions(id, m, roles, el));
  }
  // A reply still streaming into this conversation stays in place, at the end.
  for (const s of state.streams.values()) if (s.conversation === id) list.append(s.el);
}

// A stored message's actions: the arrows between its alternatives, regenerate or edit, fork,
// delete, copy and keep.
function messageActions(id, m, roles, el) {
  const actions = document.createElement("span");
  actions.className = "actions";
  if (m.alternatives > 1) actions.append(...swipeControls(id, m));
  if (m.role === "assistant" && roles.get(m.parent) === "user") actions.append(actionButton("Regenerate", "A new reply in place of this one (this one is kept)", () => regenerate(el, m)));
  if (m.role === "user") actions.append(actionButton("Edit", "Rewrite this message and get a new reply (this branch is kept)", () => editMessage(el, m)));
  actions.append(actionButton("Fork", "A new conversation with the messages up to this one", () => forkAt(id, m)));
  actions.append(actionButton("Delete", "Delete this message and everything after it", () => deleteMessage(id, m)));
  const copy = actionButton("Copy", "Copy this message's text", () => copyText(m.text, copy));
  actions.append(copy);
  actions.append(keepButton(id, m));
  return actions;
}

// Once a reply ends, the messages shown without actions (the one sent, the reply) get theirs,
// in place: the bubbles that streamed stay as they are.
async function addMissingActions(id) {
  const page = await api("GET", `/v1/conversations/${id}/messages?limit=200`).catch(() => null);
  if (!page || state.conversationId !== id) return;
  const roles = new Map(page.messages.map((m) => [m.id, m.role]));
  for (const m of page.messages) {
    const el = $("messages").querySelector(`li[data-message="${CSS.escape(m.id)}"]`);
    if (el && !el.querySelector(":scope > .actions")) el.append(messageActions(id, m, roles, el));
  }
}

function actionButton(text, title, onclick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link action";
  button.textContent = text;
  button.title = title;
  button.onclick = onclick;
  return button;
}

// The greeting a new conversation will open with, and, when the card has alternates, "‹ 1/3 ›"
// to choose another before the first message is sent.
function showGreeting(list, clone) {
  list.querySelector("li.greeting")?.remove();
  const greetings = clone.greetings ?? [clone.greeting];
  const text = greetings[state.greeting];
  const el = text
    ? addBubble(list, { who: clone.name, text, kind: "assistant greeting" })
    : greetings.length > 1 ? addBubble(list, { who: clone.name, text: "(no greeting)", kind: "assistant greeting" }) : null;
  if (!el || greetings.length < 2) return;
  list.prepend(el);
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(...arrows(state.greeting, greetings.length, "greeting", (index) => () => {
    state.greeting = index;
    showGreeting(list, clone);
  }));
  el.append(actions);
}

// "‹ 2/3 ›": the previous and next alternative of a message.
function swipeControls(conversation, m) {
  return arrows(m.alternative, m.alternatives, "alternative", (index) => async () => {
    try {
      renderPath(conversation, await api("POST", `/v1/conversations/${conversation}/active`, { message: m.id, alternative: index }));
    } catch (error) {
      showBanner(`Could not switch: ${error.message}`);
    }
  });
}

// "‹ 2/3 ›" for the `index`th of `count`; `go(i)` makes what choosing the i-th does.
function arrows(index, count, what, go) {
  const previous = actionButton("‹", `The previous ${what}`, go(index - 1));
  previous.disabled = index === 0;
  const position = document.createElement("span");
  position.className = "alternative";
  position.textContent = `${index + 1}/${count}`;
  const next = actionButton("›", `The next ${what}`, go(index + 1));
  next.disabled = index === count - 1;
  return [previous, position, next];
}

async function forkAt(conversation, m) {
  try {
    const copy = await api("POST", `/v1/conversations/${conversation}/fork`, { message: m.id });
    await showConversation(copy.id);
  } catch (error) {
    showBanner(`Could not fork: ${error.message}`);
  }
}

async function deleteMessage(conversation, m) {
  if (!window.confirm("Delete this message and everything after it?")) return;
  try {
    await api("DELETE", `/v1/conversations/${conversation}/messages/${m.id}`);
    await showConversation(conversation);
  } catch (error) {
    showBanner(`Could not delete: ${error.message}`);
  }
}

async function renameConversation() {
  const id = state.conversationId;
  const current = $("conversations").querySelector("button[aria-current=true]")?.textContent ?? "";
  const title = window.prompt("Rename this conversation", current)?.trim();
  if (!id || !title || title === current) return;
  try {
    await api("PATCH", `/v1/conversations/${id}`, { title });
    await loadConversations();
  } catch (error) {
    showBanner(`Could not rename: ${error.message}`);
  }
}

async function deleteConversation() {
  const id = state.conversationId;
  if (!id || !window.confirm("Delete this conversation and all its messages?")) return;
  try {
    await api("DELETE", `/v1/conversations/${id}`);
    await showConversation(null);
  } catch (error) {
    showBanner(`Could not delete: ${error.message}`);
  }
}

// What follows `el` leaves the path once the new reply is stored: it is hidden now.
function dropFrom(el) {
  while (el.nextSibling) el.nextSibling.remove();
  el.remove();
}

function regenerate(el, m) {
  hideBanner();
  if (request({ type: "chat.regenerate", message: m.id }, { reload: true })) dropFrom(el);
}

function editMessage(el, m) {
  const text = window.prompt("Edit your message", m.text)?.trim();
  if (!text || text === m.text) return;
  hideBanner();
  if (request({ type: "chat.edit", message: m.id, text }, { reload: true })) {
    const list = el.parentElement;
    dropFrom(el);
    addBubble(list, { who: state.user, text, kind: "user" });
  }
}

// A toggle that marks a stored message saved, so the retention purge keeps it.
function keepButton(conversation, message) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "keep link";
  const render = (saved) => {
    button.setAttribute("aria-pressed", String(saved));
    button.textContent = saved ? "Kept" : "Keep";
    button.title = saved ? "Kept past the retention period; press to let it expire" : "Keep this message past the retention period";
  };
  render(message.saved);
  button.onclick = async () => {
    const saved = button.getAttribute("aria-pressed") !== "true";
    try {
      render((await api("PATCH", `/v1/conversations/${conversation}/messages/${message.id}`, { saved })).saved);
    } catch (error) {
      showBanner(`Could not change it: ${error.message}`);
    }
  };
  return button;
}

function sendChat(event) {
  event.preventDefault();
  const text = $("chat-text").value.trim();
  if (!text || !state.cloneId) return;
  if (!socket.isOpen || busyHere()) { updateComposer(); return; }  // the text stays in the box
  hideBanner();
  const frame = { type: "chat.send", clone: state.cloneId, text };
  if (state.conversationId) frame.conversation = state.conversationId;
  else if (state.greeting > 0) frame.greeting = state.greeting;
  $("messages").querySelector("li.greeting .actions")?.remove();  // chosen, once sent
  if (state.speak && state.info?.voice?.speech) { frame.voice = true; player.unlock(); }
  const el = addBubble($("messages"), { who: state.user, text, kind: "user pending" });
  addNote(el, "sending…");
  const ref = request(frame, { newConversation: !state.conversationId });
  state.sending.set(ref, { el, text, conversation: state.conversationId ?? null });
  $("chat-text").value = "";
  updateComposer();
}

// ---------- voice: replies heard as they stream, questions spoken ----------

// Plays a voiced reply's PCM chunks back to back as they arrive (Web Audio: no container needed).
const player = {
  context: null,
  next: 0,
  unlock() {  // an AudioContext may start only in answer to the user
    this.context ??= new AudioContext();
    if (this.context.state === "suspended") this.context.resume();
  },
  play(samples, rate) {
    if (!this.context) return;
    const buffer = this.context.createBuffer(1, samples.length, rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
  },
};

// One binary frame: 0x01, the header's length (UInt16, big-endian), the JSON header, 16-bit PCM.
function onAudio(data) {
  const bytes = new DataView(data);
  if (data.byteLength < 3 || bytes.getUint8(0) !== 1) return;
  const length = bytes.getUint16(1);
  let header;
  try { header = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 3, length))); } catch { return; }
  const s = state.streams.get(header.stream);
  if (!s || header.chunk <= (s.chunk ?? 0)) return;  // not shown here, or already played (a replay)
  s.chunk = header.chunk;
  s.el.dataset.audioChunks = String(header.chunk);
  player.play(new Int16Array(data.slice(3 + length)), header.sample_rate);
}

// The speaker is set per conversation (kept in this browser); a new conversation starts with the
// last choice made, and keeps it once the server names it.
function speakingIn(conversation) {
  const chosen = JSON.parse(localStorage.getItem("parley.speak.by-conversation") ?? "{}");
  return conversation && conversation in chosen ? chosen[conversation] : localStorage.getItem("parley.speak") === "1";
}

function showSpeak() {
  state.speak = !!state.info?.voice?.speech && speakingIn(state.conversationId);
  $("speak-toggle").setAttribute("aria-pressed", String(state.speak));
  $("speak-toggle").textContent = state.speak ? "Speaking replies" : "Speak replies";
}

function setSpeak(on) {
  localStorage.setItem("parley.speak", on ? "1" : "0");
  if (state.conversationId) {
    const chosen = JSON.parse(localStorage.getItem("parley.speak.by-conversation") ?? "{}");
    chosen[state.conversationId] = on;
    localStorage.setItem("parley.speak.by-conversation", JSON.stringify(chosen));
  }
  showSpeak();
  if (on) player.unlock();
}

// Hold to talk: records while the button is held, then sends what was heard as the message.
const recorder = {
  media: null,
  chunks: [],
  async start() {
    if (this.media || !state.cloneId || busyHere()) return;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      showBanner(`The microphone could not be used: ${error.message}`);
      return;
    }
    const type = MediaRecorder.isTypeSupported("audio/webm;codecs=opus") ? "audio/webm;codecs=opus" : "";
    this.media = new MediaRecorder(stream, type ? { mimeType: type } : {});
    this.chunks = [];
    this.media.ondataavailable = (event) => { if (event.data.size) this.chunks.push(event.data); };
    this.media.onstop = () => {
      for (const track of stream.getTracks()) track.stop();
      const blob = new Blob(this.chunks, { type: this.media.mimeType || "audio/webm" });
      this.media = null;
      $("talk").removeAttribute("data-recording");
      $("talk").textContent = "Hold to talk";
      transcribe(blob);
    };
    this.media.start();
    $("talk").setAttribute("data-recording", "");
    $("talk").textContent = "Listening… let go to send";
    $("heard").textContent = "";
  },
  stop() { if (this.media?.state === "recording") this.media.stop(); },
};

async function transcribe(blob) {
  $("heard").textContent = "Listening to what you said…";
  try {
    const response = await fetch("/v1/voice/transcriptions", {
      method: "POST", headers: { "Authorization": `Bearer ${state.token}`, "Content-Type": blob.type }, body: blob,
    });
    const json = await response.json().catch(() => null);
    if (!response.ok) throw new Error(json?.error?.message ?? response.statusText);
    setCredits(json.balance);
    $("heard").textContent = `Heard: “${json.text}”`;
    $("chat-text").value = json.text;
    sendChat({ preventDefault() {} });
  } catch (error) {
    $("heard").textContent = "";
    showBanner(`Your message could not be heard: ${error.message}`);
  }
}

function stopStream() {
  for (const [stream, s] of state.streams) {
    if (!s.room && !s.ended && s.conversation === state.conversationId) request({ type: "chat.cancel", stream });
  }
}

// ---------- scheduled messages ----------

async function loadSchedules() {
  const page = await api("GET", "/v1/schedules?limit=100");
  $("schedule-list").replaceChildren(...page.schedules.map((s) => {
    const li = document.createElement("li");
    // This page got its message: delivered, even before the server recorded the write.
    const status = s.status === "fired" && state.deliveries.has(s.id) ? "delivered" : s.status;
    li.dataset.schedule = s.id;
    li.dataset.status = status;
    const what = document.createElement("span");
    what.textContent = `${cloneName(s.clone)} · ${new Date(s.at).toLocaleString()} · ${s.text ?? `prompt: ${s.prompt}`} · ${status}`;
    li.append(what);
    if (s.status === "pending") {
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.className = "danger";
      cancel.textContent = "Cancel";
      cancel.setAttribute("aria-label", `Cancel the message from ${cloneName(s.clone)} at ${new Date(s.at).toLocaleString()}`);
      cancel.onclick = () => request({ type: "schedule.cancel", schedule: s.id });
      li.append(cancel);
    }
    return li;
  }));
}

function createSchedule(event) {
  event.preventDefault();
  const frame = { type: "schedule.create", clone: $("schedule-clone").value, delay_ms: Number($("schedule-delay").value) * 1000 };
  frame[$("schedule-kind").value] = $("schedule-text").value;
  // Said once the server answers: schedule.ok, or an error naming what was wrong.
  $("schedule-status").textContent = socket.isOpen ? "Scheduling…" : "Not connected: try again once connected.";
  if (socket.isOpen) request(frame, { schedule: true });
}

function onDelivery(frame) {
  if (state.deliveries.has(frame.schedule)) return;
  state.deliveries.add(frame.schedule);
  if (frame.conversation === state.conversationId && !$("messages").querySelector(`[data-message="${CSS.escape(frame.message.id)}"]`)) {
    const el = addBubble($("messages"), { who: cloneName(state.cloneId), text: frame.message.text, kind: "assistant" });
    el.dataset.message = frame.message.id;
  }
  $("schedule-status").textContent = `A scheduled message arrived: “${frame.message.text.slice(0, 80)}”`;
  loadSchedules();
  loadConversations();
}

// ---------- rooms ----------

function renderDebaters() {
  $("debate-clones").replaceChildren(...state.clones.map((c, i) => {
    const div = document.createElement("div");
    div.className = "debater";
    const check = document.createElement("input");
    check.type = "checkbox"; check.id = `debater-${i}`; check.value = c.id; check.checked = i < 2;
    const label = document.createElement("label");
    label.htmlFor = check.id;
    label.textContent = c.name;
    const stance = document.createElement("input");
    stance.type = "text"; stance.placeholder = "stance"; stance.dataset.clone = c.id;
    stance.setAttribute("aria-label", `${c.name}'s stance`);
    stance.value = i === 0 ? "for" : i === 1 ? "against" : "";
    div.append(check, label, stance);
    return div;
  }));
}

async function createDebate(event) {
  event.preventDefault();
  const clones = [...$("debate-clones").querySelectorAll("input[type=checkbox]:checked")].map((check) => ({
    clone: check.value,
    stance: $("debate-clones").querySelector(`input[data-clone="${CSS.escape(check.value)}"]`).value || "undecided",
  }));
  try {
    const room = await api("POST", "/v1/rooms", {
      kind: "debate", topic: $("debate-topic").value, clones, rounds: Number($("debate-rounds").value),
      turn_policy: $("debate-policy").value, max_tokens_per_turn: Number($("debate-tokens").value),
      visibility: $("debate-public").checked ? "link" : "private",
    });
    joinRoom(room.id, undefined, true);
  } catch (error) {
    showBanner(`Could not create the debate: ${error.message}`);
  }
}

async function createTranslation(event) {
  event.preventDefault();
  const members = $("translation-members").value.split(",").map((m) => m.trim()).filter(Boolean);
  const language = $("translation-language").value;
  try {
    const room = await api("POST", "/v1/rooms", { kind: "translation", members, languages: { [state.user]: language } });
    joinRoom(room.id, language, true);
  } catch (error) {
    showBanner(`Could not create the chat: ${error.message}`);
  }
}

function joinRoom(id, language, reveal = false) {
  const frame = { type: "room.join", room: id };
  if (language) frame.language = language;
  request(frame, { room: id, language, reveal });
  $("join-room").value = id;
}

// The rooms this user made, to go back to after a reload.
async function loadMyRooms() {
  try {
    const page = await api("GET", "/v1/rooms?limit=100");
    $("my-rooms-empty").hidden = page.rooms.length > 0;
    $("my-rooms").replaceChildren(...page.rooms.slice().reverse().map((room) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = `${room.kind === "debate" ? room.topic : "Translation chat"} · ${room.status}`;
      if (state.room?.room.id === room.id) button.setAttribute("aria-current", "true");
      button.onclick = () => joinRoom(room.id, undefined, true);
      li.append(button);
      return li;
    }));
  } catch (error) {
    $("my-rooms-empty").hidden = false;
    $("my-rooms-empty").textContent = `Could not load your rooms: ${error.message}`;
  }
}

function onRoomState(frame, handler) {
  const language = handler?.language ?? state.room?.language;
  for (const [stream, s] of state.streams) if (s.room) state.streams.delete(stream);
  // Past 100 sockets a room lists its members to its owner only: the others see how many.
  state.room = { room: frame.room, members: frame.members, count: frame.member_count, language };
  const room = frame.room;
  setRoute(`#/r/${room.id}`);
  $("room").hidden = false;
  $("room-title").textContent = room.kind === "debate" ? `Debate: ${room.topic}` : "Translation chat";
  renderRoomMeta();
  $("room-controls").hidden = !(room.kind === "debate" && room.moderator === state.user);
  // A link room is joined by whoever has its id: the link is the room's address in this app.
  $("copy-room-link").hidden = room.visibility !== "link";
  loadMyRooms();
  // Joined by a click (created, or picked from the list): the room comes into view.
  if (handler?.reveal) { $("room").scrollIntoView({ block: "start" }); $("room-title").focus(); }
  const log = $("room-log");
  log.replaceChildren();
  // A turn the moderator regenerated gives way to the take that replaced it, and so does a turn
  // cut short that its clone took again next.
  const replaced = new Set(frame.transcript.filter((e) => e.kind === "turn" && e.source).map((e) => e.source));
  const turns = frame.transcript.filter((e) => e.kind === "turn");
  turns.forEach((e, i) => { if (e.interrupted && turns[i + 1]?.clone === e.clone) replaced.add(e.id); });
  for (const entry of frame.transcript) if (!replaced.has(entry.id)) addEntry(entry);
  updateRoomControls();
}

// The moderator's buttons follow the room's state (RoomLifecycle): only what the room allows
// now is enabled, and Pause and Resume take turns in one place.
function updateRoomControls() {
  if (!state.room) return;
  const room = state.room.room;
  const status = room.status;
  const turnStreaming = [...state.streams.values()].some((s) => s.room === room.id && !s.ended);
  const hasTurn = $("room-log").querySelector("li.clone") !== null;
  const allowed = {
    start: status === "open", pause: status === "running", resume: status === "paused", next: status === "running",
    regenerate: (status === "running" || status === "paused") && !turnStreaming && hasTurn, end: status !== "ended",
  };
  for (const button of $("room-controls").querySelectorAll("button")) {
    const control = button.dataset.control;
    button.disabled = !allowed[control];
    button.hidden = (control === "resume" && status !== "paused") || (control === "pause" && status === "paused");
  }
}

function renderRoomMeta() {
  const { room, members, count } = state.room;
  const status = room.status ? ` · ${room.status}` : "";
  const here = members.length === 0 && count > 0 ? `${count} people` : members.join(", ");
  $("room-meta").textContent = `Room ${room.id}${status} · here: ${here}`;
  $("room-meta").dataset.status = room.status ?? "";
}

function addEntry(entry) {
  const who = entry.clone ? cloneName(entry.clone) : entry.user === state.user ? "you" : entry.user;
  const el = addBubble($("room-log"), {
    who, text: entry.text, kind: entry.user === state.user ? "user" : "clone", markdown: Boolean(entry.clone), at: entry.created_at,
  });
  if (entry.clone) markDebater(el, entry.clone);
  el.dataset.entry = entry.id;
  if (entry.untranslated) addNote(el, "not translated");
  if (entry.interrupted) addNote(el, "cut short");
}

function onRoomEvent(frame) {
  if (!state.room || frame.room !== state.room.room.id) return;
  const log = $("room-log");
  const room = state.room.room;
  switch (frame.event) {
    case "said": return addEntry(frame.entry);
    case "turn": {
      if (frame.replaces) log.querySelector(`[data-entry="${CSS.escape(frame.replaces)}"]`)?.remove();
      // A turn cut short (a pause, a restart) is taken again by the same clone: the new take
      // takes its place, as a regenerated one does, so the turn shows once.
      const last = [...log.querySelectorAll("li.clone")].pop();
      if (last && last.dataset.clone === frame.clone && ["cancelled", "interrupted", "shutdown", "error"].includes(last.dataset.reason)) last.remove();
      break;
    }
    case "joined": if (!state.room.members.includes(frame.user)) state.room.members.push(frame.user); break;
    case "left": state.room.members = state.room.members.filter((m) => m !== frame.user); break;
    case "started": case "resumed": room.status = "running"; break;
    case "paused": room.status = "paused"; break;
    case "ended": room.status = "ended"; break;
  }
  const text = {
    joined: `${frame.user} joined`, left: `${frame.user} left`, started: `${frame.by} started the debate`,
    paused: frame.reason === "insufficient_credits" ? "paused: the moderator is out of credits" : `${frame.by} paused`,
    resumed: `${frame.by} resumed`, next: `${frame.by} moved to the next turn`,
    regenerating: `${frame.by} asked ${cloneName(frame.clone)} for a new take of the last turn`, turn: `turn ${frame.turn}${totalTurns() ? ` of ${totalTurns()}` : ""}: ${cloneName(frame.clone)}`,
    muted: `${frame.by} muted ${frame.clone ? cloneName(frame.clone) : frame.user}`,
    unmuted: `${frame.by} unmuted ${frame.clone ? cloneName(frame.clone) : frame.user}`, kicked: `${frame.by} removed ${frame.user}`,
    ended: frame.reason === "rounds_done" ? "the debate is over" : "the room ended",
  }[frame.event];
  if (text) addEvent(log, text);
  renderRoomMeta();
  updateRoomControls();
}

// Each debater keeps one colour and shows its stance beside its name.
function markDebater(el, clone) {
  el.dataset.clone = clone;
  const debaters = state.room?.room.clones ?? [];
  const index = debaters.findIndex((d) => d.clone === clone);
  if (index < 0) return;
  el.dataset.debater = String(index % 6);
  const stance = debaters[index].stance;
  if (stance) el.querySelector(".who").dataset.stance = stance;
}

function totalTurns() {
  const room = state.room?.room;
  return room?.rounds && room?.clones ? room.rounds * room.clones.length : 0;
}

function sayInRoom(event) {
  event.preventDefault();
  const text = $("room-text").value.trim();
  if (!text || !state.room) return;
  if (request({ type: "room.say", room: state.room.room.id, text })) $("room-text").value = "";
}

function leaveRoom() {
  if (!state.room) return;
  request({ type: "room.leave", room: state.room.room.id });
  state.room = null;
  setRoute(state.conversationId ? `#/c/${state.conversationId}` : "");
  $("room").hidden = true;
}

// ---------- account ----------

async function exportAccount() {
  $("account-status").textContent = "Preparing your data…";
  try {
    const response = await fetch("/v1/me/export", { headers: { Authorization: `Bearer ${state.token}` } });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `parley-${state.user}.json`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    $("account-status").textContent = "Downloaded.";
  } catch (error) {
    $("account-status").textContent = `Could not export: ${error.message}`;
  }
}

async function deleteAccount() {
  if (!confirm("Delete your account and everything in it? This cannot be undone.")) return;
  try {
    await api("DELETE", "/v1/me");
  } catch (error) {
    $("account-status").textContent = `Could not delete: ${error.message}`;
    return;
  }
  socket.close();
  sessionStorage.removeItem("parley.token");
  state.token = null;
  state.user = null;
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = "Your account was deleted.";
  $("signin-title").focus();
}

// ---------- signing in ----------

async function signIn(token) {
  state.token = token;
  try {
    const credits = await api("GET", "/v1/credits?limit=1");
    setCredits(credits.balance);
  } catch (error) {
    state.token = null;
    sessionStorage.removeItem("parley.token");
    $("signin-error").textContent = error.status === 401 ? "That token was not accepted (expired or from another server)." : error.message;
    return;
  }
  sessionStorage.setItem("parley.token", token);
  state.user = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub;
  $("user-name").textContent = state.user;
  socket.connect();
  // The app appears once its first view is chosen: a nav click made while the clones load
  // would otherwise be overridden by that choice.
  let view = null;
  try {
    await loadClones();
    editClone(null);
    view = await restoreRoute();
    if (!view) await showConversation(null);  // an empty new conversation (with its clone's greeting, if any)
  } finally {
    $("signin").hidden = true;
    $("app").hidden = false;
    show(view ?? (state.clones.length ? "chat" : "clones"));
  }
}

// The view the URL names, opened again after a reload: the conversation (its clone chosen, a
// reply still being written resumed) or the room (joined once connected). Null when none.
async function restoreRoute() {
  const route = /^#\/([cr])\/([A-Za-z0-9_]+)$/.exec(location.hash);
  if (!route) return null;
  if (route[1] === "r") {
    if (socket.isOpen) joinRoom(route[2]); else state.restoreRoom = route[2];
    return "rooms";
  }
  try {
    const conversation = await api("GET", `/v1/conversations/${route[2]}`);
    if (!state.clones.some((c) => c.id === conversation.clone)) return null;
    state.cloneId = conversation.clone;
    $("chat-clone").value = conversation.clone;
    showModel();
    await showConversation(conversation.id);
    return "chat";
  } catch {
    setRoute("");
    return null;  // deleted meanwhile, or not this user's
  }
}

// Signing out ends the session on the server too: the token is refused from then on.
async function signOut() {
  await api("POST", "/v1/me/sign-out", {}).catch(() => {});  // a token naming no session just goes
  socket.close();
  sessionStorage.removeItem("parley.token");
  location.reload();
}

async function start() {
  fillSelect($("join-language"), [["", "(unchanged)"], ...LANGUAGES], "");
  fillSelect($("translation-language"), LANGUAGES, "en");
  renderSliders();
  for (const button of document.querySelectorAll("nav button")) button.onclick = () => show(button.dataset.view);
  $("token-form").onsubmit = (event) => { event.preventDefault(); signIn($("token-input").value.trim()); };
  $("dev-form").onsubmit = async (event) => {
    event.preventDefault();
    try {
      const response = await fetch("/v1/dev/token", { method: "POST", headers: { "Content-Type": "application/json" },
                                                      body: JSON.stringify({ user: $("dev-user").value.trim() }) });
      const json = await response.json();
      if (!response.ok) throw new Error(json.error?.message ?? response.statusText);
      signIn(json.token);
    } catch (error) {
      $("signin-error").textContent = error.message;
    }
  };
  $("sign-out").onclick = signOut;
  $("export-account").onclick = exportAccount;
  $("limits-form").onsubmit = saveLimits;
  $("persona-form").onsubmit = savePersona;
  $("delete-account").onclick = deleteAccount;
  $("search-form").onsubmit = search;
  $("chat-clone").onchange = () => { state.cloneId = $("chat-clone").value; showModel(); showConversation(null); };
  $("new-conversation").onclick = () => { showConversation(null); $("chat-text").focus(); };
  $("rename-conversation").onclick = renameConversation;
  $("delete-conversation").onclick = deleteConversation;
  $("chat-form").onsubmit = sendChat;
  $("banner-close").onclick = () => hideBanner();
  $("make-first-clone").onclick = () => { show("clones"); editClone(null); $("clone-name").focus(); };
  // On a phone the conversation list is a drawer above the chat.
  $("side-toggle").onclick = () => {
    const open = $("chat-side").toggleAttribute("data-open");
    $("side-toggle").setAttribute("aria-expanded", String(open));
  };
  // Esc stops the reply being written in the open conversation.
  document.addEventListener("keydown", (event) => { if (event.key === "Escape" && !$("stop").hidden) stopStream(); });
  window.addEventListener("offline", () => setConnection("offline: waiting for the network…"));
  window.addEventListener("online", () => { if (socket.isOpen) setConnection("connected"); });
  // Ctrl+Enter (⌘+Enter) regenerates the open conversation's last reply.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey) || $("view-chat").hidden || busyHere() || !socket.isOpen) return;
    const last = [...$("messages").querySelectorAll("li.assistant[data-message]")].pop();
    if (!last || !last.querySelector(".actions button")) return;
    event.preventDefault();
    regenerate(last, { id: last.dataset.message });
  });
  $("chat-text").onkeydown = (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); $("chat-form").requestSubmit(); }
  };
  $("stop").onclick = stopStream;
  $("new-clone").onclick = () => editClone(null);
  $("clone-form").onsubmit = saveClone;
  $("delete-clone").onclick = deleteClone;
  $("schedule-form").onsubmit = createSchedule;
  $("join-form").onsubmit = (event) => { event.preventDefault(); joinRoom($("join-room").value.trim(), $("join-language").value || undefined, true); };
  $("debate-form").onsubmit = createDebate;
  $("translation-form").onsubmit = createTranslation;
  $("room-form").onsubmit = sayInRoom;
  $("leave-room").onclick = leaveRoom;
  $("copy-room-link").onclick = () => copyText(`${location.origin}${location.pathname}#/r/${state.room.room.id}`, $("copy-room-link"));
  for (const button of $("room-controls").querySelectorAll("button")) {
    button.onclick = () => request({ type: "room.control", room: state.room.room.id, action: button.dataset.control });
  }

  const info = await fetch("/v1/info").then((r) => r.json()).catch(() => ({}));
  state.info = info;
  $("dev-form").hidden = !info.dev;
  // Voice where the server has it: the speaker toggle for speech, hold-to-talk for transcription.
  $("voice-controls").hidden = !info.voice?.speech && !info.voice?.transcription;
  $("speak-toggle").hidden = !info.voice?.speech;
  $("talk").hidden = !info.voice?.transcription || !navigator.mediaDevices || typeof MediaRecorder === "undefined";
  showSpeak();
  $("speak-toggle").onclick = () => setSpeak(!state.speak);
  const talk = $("talk");
  talk.onpointerdown = (event) => { event.preventDefault(); recorder.start(); };
  talk.onpointerup = talk.onpointerleave = () => recorder.stop();
  talk.onkeydown = (event) => { if ((event.key === " " || event.key === "Enter") && !event.repeat) { event.preventDefault(); recorder.start(); } };
  talk.onkeyup = (event) => { if (event.key === " " || event.key === "Enter") recorder.stop(); };
  if (state.token) await signIn(state.token);
  if (!state.user) { $("signin").hidden = false; $("signin-title").focus(); }
}

start();
