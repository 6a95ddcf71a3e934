// The peer of iq-bench: the same workload on automerge-repo. One hub
// configured like automerge-repo-sync-server (WebSocket server adapter,
// Node filesystem storage, shares nothing on its own), one client repo per
// quarter with one document each, all in this process.
//
//   node bench.mjs --quarters Q --concerns M --live N --seed S --dir DIR
//
// Prints one JSON line with the results on stdout; progress on stderr.
import { Repo } from "@automerge/automerge-repo"
import {
  WebSocketClientAdapter,
  WebSocketServerAdapter,
} from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import { ImmutableString } from "@automerge/automerge"
import { WebSocketServer } from "ws"
import { performance } from "node:perf_hooks"
import path from "node:path"

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1]])
    return acc
  }, []),
)
const Q = Number(args.quarters ?? 2)
const M = Number(args.concerns ?? 20)
const LIVE = Number(args.live ?? 10)
const TIMEOUT_MS = Number(args["timeout-ms"] ?? 900_000)
const dir = args.dir
if (!dir || !(Q >= 1) || !(M >= 0) || !(LIVE >= 0)) {
  console.error("usage: node bench.mjs --quarters Q --concerns M --live N --seed S --dir DIR")
  process.exit(2)
}

// splitmix64, as in the Rust harness, so the same seed picks the same quarters.
let state = BigInt(args.seed ?? 8)
const MASK = (1n << 64n) - 1n
function next() {
  state = (state + 0x9e3779b97f4a7c15n) & MASK
  let z = state
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK
  return z ^ (z >> 31n)
}
const hex = (n) => n.toString(16).padStart(16, "0")

// One concern: a map of six scalar fields, one change.
function putConcern(handle, n) {
  const id = hex(next()) + hex(next())
  handle.change((d) => {
    d.concerns[id] = {
      id: new ImmutableString(id),
      category: new ImmutableString("road-damage"),
      description: new ImmutableString(`Pothole number ${n} at the corner`),
      status: new ImmutableString("open"),
      created_ms: 1_780_000_000_000 + n,
      lat: 51.05 + (n % 1000) * 1e-5 + 1e-9,
    }
  })
}

const log = (...a) => console.error("peer:", ...a)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const same = (a, b) => a.length === b.length && a.every((h, i) => h === b[i])
function headsOf(handle) {
  try {
    return handle && handle.isReady() ? [...handle.heads()].sort() : null
  } catch {
    return null
  }
}

// Waits, checking every millisecond, until `done()`; returns ms since t0.
async function until(what, t0, done) {
  for (;;) {
    if (done()) return performance.now() - t0
    if (performance.now() - t0 > TIMEOUT_MS) throw new Error(`timed out waiting for ${what}`)
    await sleep(1)
  }
}

// What `withinBound` gives when the bound passed first.
const TIMED_OUT = Symbol("timed out")

// `promise`'s value, or TIMED_OUT once TIMEOUT_MS have passed since t0: a
// find that never settles must not hold the run past its bound.
function withinBound(promise, t0) {
  let timer
  const bound = new Promise((resolve) => {
    timer = setTimeout(resolve, Math.max(0, TIMEOUT_MS - (performance.now() - t0)), TIMED_OUT)
  })
  return Promise.race([promise, bound]).finally(() => clearTimeout(timer))
}

// A find can report a document unavailable while the hub is still taking
// it in (or has not answered yet); an application asks again.
async function findRetrying(repo, url, t0) {
  for (;;) {
    try {
      return await repo.find(url)
    } catch (e) {
      if (performance.now() - t0 > TIMEOUT_MS) throw e
      await sleep(50)
    }
  }
}

// The hub: bytes in and out of every socket are counted.
const traffic = { in: 0, out: 0 }
const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
wss.on("connection", (socket) => {
  socket.on("message", (data) => {
    traffic.in += data.byteLength ?? data.length
  })
  const send = socket.send.bind(socket)
  socket.send = (data, ...rest) => {
    traffic.out += data.byteLength ?? data.length
    return send(data, ...rest)
  }
})
await new Promise((r) => wss.once("listening", r))
const url = `ws://127.0.0.1:${wss.address().port}`
const hub = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(path.join(dir, "hub")),
  peerId: "storage-server-hub",
  sharePolicy: async () => false,
})

// P1: every quarter records M concerns with no network.
const clients = []
for (let q = 0; q < Q; q++) {
  const repo = new Repo({
    storage: new NodeFSStorageAdapter(path.join(dir, `q${q}`)),
    peerId: `quarter-${q}`,
  })
  const handle = repo.create({ concerns: {} })
  for (let n = 0; n < M; n++) putConcern(handle, n)
  clients.push({ repo, handle, others: new Map() })
}
await Promise.all(clients.map((c) => c.repo.flush()))
const expected = clients.map((c) => headsOf(c.handle))
log(`recorded ${Q * M} concerns offline`)

const t0 = performance.now()
for (const c of clients) c.repo.networkSubsystem.addNetworkAdapter(new WebSocketClientAdapter(url))
const toCentre = await until("the hub to hold every quarter document", t0, () =>
  clients.every((c, q) => {
    const h = headsOf(hub.handles[c.handle.documentId])
    return h !== null && same(h, expected[q])
  }),
)
const centreReceived = traffic.in
// Logged as it comes: the fetches below may not finish in time.
log(`P1 the hub holds every quarter document after ${toCentre.toFixed(1)} ms (${centreReceived} B in)`)
// Then every quarter fetches every other quarter's document from the hub.
// Within the bound, or the time to the hub is reported alone.
let toAll = null
// P1 as measured so far (no time to every quarter, nor its bytes, until
// every quarter holds every document).
const p1Result = () => ({
  quarters: Q,
  concerns_per_quarter: M,
  to_centre_ms: toCentre,
  to_all_ms: toAll,
  centre_received_bytes: centreReceived,
  all_bytes: toAll === null ? null : traffic.in + traffic.out,
})
// What is measured so far, once the run cannot go on: P2 needs every
// quarter to hold every document.
function reportUnfinished(reason) {
  log(reason)
  const p1 = p1Result()
  console.log(JSON.stringify({ p1, p2: null, unfinished: reason, versions: { node: process.version } }))
  process.exit(0)
}
// automerge-repo's WebSocket client leaves some socket errors unhandled
// (ECONNRESET on a reconnect while the hub is busy, seen at 64 × 1,000),
// which would end the process without a report.
process.on("uncaughtException", (e) => reportUnfinished(`an error automerge-repo did not handle: ${e.message}`))
try {
  const found = await withinBound(
    Promise.all(
      clients.flatMap((c, q) =>
        clients
          .filter((_, p) => p !== q)
          .map(async (o) => {
            c.others.set(o.handle.documentId, await findRetrying(c.repo, o.handle.url, t0))
          }),
      ),
    ),
    t0,
  )
  if (found === TIMED_OUT) throw new Error(`the quarters' finds had not all settled after ${TIMEOUT_MS / 1000} s`)
  toAll = await until("every quarter to hold every document", t0, () =>
    clients.every((c) =>
      clients.every((o, p) => {
        if (o === c) return true
        const h = headsOf(c.others.get(o.handle.documentId))
        return h !== null && same(h, expected[p])
      }),
    ),
  )
  await sleep(500) // let the last acknowledgements pass before counting
} catch (e) {
  reportUnfinished(`every quarter holding every document: ${e.message}`)
}
const p1 = p1Result()
log("P1", JSON.stringify(p1))

// P2: one concern at a time at a random quarter.
const toCentreLat = []
const toEveryLat = []
for (let n = 0; n < LIVE; n++) {
  const w = Number(next() % BigInt(Q))
  const writer = clients[w]
  const doc = writer.handle.documentId
  const t = performance.now()
  putConcern(writer.handle, M + n)
  const target = headsOf(writer.handle)
  toCentreLat.push(
    await until(`live write ${n} at the hub`, t, () => {
      const h = headsOf(hub.handles[doc])
      return h !== null && same(h, target)
    }),
  )
  toEveryLat.push(
    await until(`live write ${n} at every quarter`, t, () =>
      clients.every((c, q) => q === w || same(headsOf(c.others.get(doc)) ?? [], target)),
    ),
  )
}
function stats(v) {
  const s = [...v].sort((a, b) => a - b)
  const at = (p) => s[Math.min(s.length, Math.max(1, Math.ceil(p * s.length))) - 1]
  return s.length ? { p50: at(0.5), p99: at(0.99), max: s[s.length - 1] } : { p50: 0, p99: 0, max: 0 }
}
const p2 = {
  quarters: Q,
  writes: LIVE,
  to_centre_ms: stats(toCentreLat),
  to_every_quarter_ms: stats(toEveryLat),
}
console.log(JSON.stringify({ p1, p2, versions: { node: process.version } }))
for (const c of clients) c.repo.shutdown()
hub.shutdown()
wss.close()
process.exit(0)
