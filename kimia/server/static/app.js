// kimia web page: record (WebAudio -> 16-bit WAV) or upload audio, send it to the OpenAI-compatible API,
// show the answer's text as it streams (server-sent events) and play its 24 kHz PCM16 chunks as they arrive.
"use strict";
const $ = (id) => document.getElementById(id);
let recorded = null;       // Blob (audio/wav) of the last recording
let recorder = null;       // {ctx, stream, node, chunks, rate}
let playCtx = null, playAt = 0;

function setStatus(msg, isError) { $("status").textContent = msg; $("status").className = isError ? "err" : ""; }

function encodeWav(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * n), v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true); v.setUint32(24, rate, true);
  v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true); str(36, "data");
  v.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) for (let i = 0; i < c.length; i++, o += 2) {
    const s = Math.max(-1, Math.min(1, c[i])); v.setInt16(o, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

async function toggleRecord() {
  if (recorder) {
    recorder.node.disconnect(); recorder.stream.getTracks().forEach((t) => t.stop());
    recorded = encodeWav(recorder.chunks, recorder.rate); await recorder.ctx.close(); recorder = null;
    $("record").textContent = "🎤 Record"; $("record").classList.remove("rec");
    $("input-player").src = URL.createObjectURL(recorded); $("input-player").hidden = false;
    $("file").value = ""; setStatus("Recorded " + (recorded.size / 1024).toFixed(0) + " kB. Press Send.");
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const ctx = new AudioContext(), src = ctx.createMediaStreamSource(stream);
    const node = ctx.createScriptProcessor(4096, 1, 1), chunks = [];
    node.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    src.connect(node); node.connect(ctx.destination);
    recorder = { ctx, stream, node, chunks, rate: ctx.sampleRate };
    $("record").textContent = "⏹ Stop"; $("record").classList.add("rec"); setStatus("Recording…");
  } catch (e) { setStatus("Microphone unavailable: " + e.message, true); }
}

function playPcm16(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  if (!pcm.length) return;
  if (!playCtx) { playCtx = new AudioContext({ sampleRate: 24000 }); playAt = 0; }
  const buf = playCtx.createBuffer(1, pcm.length, 24000), ch = buf.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = playCtx.createBufferSource(); src.buffer = buf; src.connect(playCtx.destination);
  playAt = Math.max(playAt, playCtx.currentTime + 0.05); src.start(playAt); playAt += buf.duration;
  $("chunks").textContent = String(Number($("chunks").textContent) + 1);
  $("seconds").textContent = (Number($("seconds").textContent) + buf.duration).toFixed(2);
}

function headers(extra) {
  const h = Object.assign({}, extra || {}), key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try { const j = await resp.json(); return j.error ? j.error.message : JSON.stringify(j); }
  catch (e) { return resp.statusText; }
}

function audioInput() {
  const f = $("file").files[0];
  return f || recorded;
}

function b64(buf) {
  let s = ""; const b = new Uint8Array(buf);
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode.apply(null, b.subarray(i, i + 0x8000));
  return btoa(s);
}

async function send() {
  const audio = audioInput(), text = $("text").value.trim();
  const mode = document.querySelector("input[name=mode]:checked").value;
  const maxTokens = parseInt($("maxtokens").value, 10);
  if (!audio && !text) { setStatus("Record or choose an audio file first.", true); return; }
  $("answer").textContent = ""; $("chunks").textContent = "0"; $("seconds").textContent = "0.00";
  $("send").disabled = true; setStatus("Sending…");
  if (playCtx) { await playCtx.close(); playCtx = null; }
  try {
    if (mode === "transcribe") {
      if (!audio) throw new Error("transcription needs audio");
      const form = new FormData();
      form.append("file", audio, audio.name || "recording.wav"); form.append("model", $("model").value);
      const resp = await fetch("/v1/audio/transcriptions", { method: "POST", body: form, headers: headers() });
      if (!resp.ok) throw new Error(await errorText(resp));
      $("answer").textContent = (await resp.json()).text; setStatus("Done.");
      return;
    }
    const content = [];
    if (text) content.push({ type: "text", text });
    if (audio) {
      const name = (audio.name || "x.wav").toLowerCase(), fmt = name.split(".").pop();
      content.push({ type: "input_audio", input_audio: { data: b64(await audio.arrayBuffer()),
        format: ["wav", "mp3", "flac", "ogg"].includes(fmt) ? fmt : "wav" } });
    }
    const body = { model: $("model").value, stream: true, messages: [{ role: "user", content }],
      modalities: mode === "both" ? ["text", "audio"] : ["text"] };
    if (mode === "both") body.audio = { voice: "default", format: "pcm16" };
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const resp = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
      headers: headers({ "Content-Type": "application/json" }) });
    if (!resp.ok) throw new Error(await errorText(resp));
    setStatus("Answering…");
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let pending = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += dec.decode(value, { stream: true });
      let cut;
      while ((cut = pending.indexOf("\n\n")) >= 0) {
        const line = pending.slice(0, cut).trim(); pending = pending.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { finished = true; break; }
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        const delta = ev.choices && ev.choices[0] ? ev.choices[0].delta : {};
        if (delta.content) $("answer").textContent += delta.content;
        if (delta.audio && delta.audio.data) playPcm16(delta.audio.data);
      }
    }
    setStatus("Done.");
  } catch (e) {
    setStatus("Error: " + e.message, true);
  } finally { $("send").disabled = false; }
}

$("record").addEventListener("click", toggleRecord);
$("send").addEventListener("click", send);
$("file").addEventListener("change", () => { recorded = null; $("input-player").hidden = true;
  if ($("file").files[0]) setStatus("Chose " + $("file").files[0].name + ". Press Send."); });
