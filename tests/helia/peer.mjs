// A real Helia (JS IPFS) peer for the tests that check us against it (tests/test_*_helia.py) and for
// bench/bench_bitswap.py.
//
// TCP + noise + yamux, identify, ping and bitswap 1.2.0 on 127.0.0.1; no DHT, no routers, no HTTP
// gateways unless a mode names them: it only talks to what it is told about. One JSON line on stdout
// says what it did.
//
//   node peer.mjs add DIR [LAYOUT]          import DIR, print {peer_id, addrs, cid, files}, then serve its
//                                           blocks until stdin closes; LAYOUT is one of LAYOUTS below
//   node peer.mjs fetch CID MULTIADDR OUT   dial MULTIADDR, write the UnixFS tree CID under OUT with
//                                           unixfs ls/cat, print {files, bytes, seconds}
//   node peer.mjs routed CID URL OUT        the same knowing only URL, a Delegated Routing V1 HTTP API
//                                           (the commons index): providers come from it, blocks over
//                                           bitswap; prints {files, bytes, seconds, providers}
//   node peer.mjs car URL CID OUT           @helia/verified-fetch over HTTP only, URL its only router:
//                                           fetch ipfs://CID?format=car (blocks from the gateways URL
//                                           names), write the CAR to OUT, print {status, type, bytes}
//   node peer.mjs dht CID MULTIADDR         kad-dht (client) bootstrapped from MULTIADDR alone: find the
//                                           providers of CID, print {providers: [{id, addrs}]}
//
// setup.sh installs the pinned packages; the caller runs a copy of this file beside that node_modules.
import { createWriteStream, createReadStream } from 'node:fs'
import { mkdir, readdir, writeFile } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { withBitswap } from '@helia/bitswap'
import { delegatedHTTPRouter } from '@helia/delegated-routing-client'
import { withHTTP } from '@helia/http'
import { withLibp2pLight } from '@helia/libp2p'
import { unixfs } from '@helia/unixfs'
import { createVerifiedFetchWithHelia } from '@helia/verified-fetch'
import { identify } from '@libp2p/identify'
import { kadDHT } from '@libp2p/kad-dht'
import { noise } from '@libp2p/noise'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { yamux } from '@libp2p/yamux'
import { multiaddr } from '@multiformats/multiaddr'
import { createHeliaLight } from 'helia'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { CID } from 'multiformats/cid'

const TIMEOUT_MS = 120_000

// @helia/unixfs's own defaults are Filecoin's (CIDv1, raw leaves, 1 MiB chunks, 1024 links per node);
// `ipfs add` (Kubo) uses 256 KiB chunks and 174 links, dag-pb leaves under CIDv0.
const KUBO = {
  rawLeaves: false,
  cidVersion: 0,
  chunker: fixedSize({ chunkSize: 262_144 }),
  layout: balanced({ maxChildrenPerNode: 174 }),
  profile: 'unixfs-v0-2015'
}
const LAYOUTS = {
  helia: {},
  kubo: KUBO, // ipfs add
  'kubo-v1': { ...KUBO, rawLeaves: true, cidVersion: 1 } // ipfs add --cid-version 1
}

async function startHelia (init = {}, services = {}) {
  const helia = withBitswap(withLibp2pLight(createHeliaLight(init), {
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify(), ping: ping(), ...services }
  }))
  await helia.start()
  return helia
}

// every file under dir, sorted, as importer candidates named "<basename>/<relative path>"
async function * candidates (dir, prefix) {
  const entries = await readdir(dir, { withFileTypes: true })
  entries.sort((a, b) => Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)))
  if (entries.length === 0) {
    yield { path: prefix }
  }
  for (const entry of entries) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) {
      yield * candidates(path, `${prefix}/${entry.name}`)
    } else {
      yield { path: `${prefix}/${entry.name}`, content: createReadStream(path) }
    }
  }
}

async function add (dir, layout = 'helia') {
  const helia = await startHelia()
  const fs = unixfs(helia)
  const name = basename(dir)
  const files = {}
  let root
  const options = LAYOUTS[layout]
  if (options == null) {
    throw new Error(`unknown layout ${layout}: use one of ${Object.keys(LAYOUTS).join(', ')}`)
  }
  for await (const entry of fs.addAll(candidates(dir, name), options)) {
    files[entry.path] = entry.cid.toString()
    if (entry.path === name) {
      root = entry.cid
    }
  }
  const addrs = helia.libp2p.getMultiaddrs().map(String)
  console.log(JSON.stringify({ peer_id: helia.libp2p.peerId.toString(), addrs, cid: root.toString(), files }))
  // serve until the caller closes our stdin (or kills us)
  const done = new Promise(resolve => {
    process.stdin.on('end', resolve)
    process.stdin.on('close', resolve)
    process.on('SIGTERM', resolve)
  })
  process.stdin.resume()
  await done
  await helia.stop()
}

async function fetch (cidText, addr, out) {
  const helia = await startHelia()
  const signal = AbortSignal.timeout(TIMEOUT_MS)
  const started = performance.now()
  await helia.libp2p.dial(multiaddr(addr), { signal })
  const counts = await writeTree(helia, CID.parse(cidText), out, signal)
  const seconds = (performance.now() - started) / 1000
  console.log(JSON.stringify({ ...counts, seconds }))
  await helia.stop()
}

async function routed (cidText, url, out) {
  // bitswap records only: a gateway record is for HTTP clients (the `car` mode below)
  const router = delegatedHTTPRouter({ url, filterProtocols: ['transport-bitswap'] })
  const helia = await startHelia({ routers: [router] })
  const signal = AbortSignal.timeout(TIMEOUT_MS)
  const started = performance.now()
  const cid = CID.parse(cidText)
  const providers = []
  for await (const provider of helia.routing.findProviders(cid, { signal })) {
    providers.push(provider.id.toString())
  }
  const counts = await writeTree(helia, cid, out, signal)
  const seconds = (performance.now() - started) / 1000
  console.log(JSON.stringify({ ...counts, seconds, providers }))
  await helia.stop()
}

async function car (url, cidText, out) {
  // no libp2p: blocks come from the trustless gateways the router names, checked against their CIDs
  const helia = await withHTTP(createHeliaLight(), {
    delegatedRouters: [url],
    recursiveGateways: [],
    allowLocal: true,
    allowInsecure: true
  }).start()
  const verifiedFetch = await createVerifiedFetchWithHelia(helia)
  const response = await verifiedFetch(`ipfs://${cidText}?format=car`, {
    headers: { accept: 'application/vnd.ipld.car; version=1; order=dfs; dups=n' },
    signal: AbortSignal.timeout(TIMEOUT_MS)
  })
  const bytes = new Uint8Array(await response.arrayBuffer())
  await writeFile(out, bytes)
  console.log(JSON.stringify({
    status: response.status, type: response.headers.get('content-type'), bytes: bytes.byteLength
  }))
  await verifiedFetch.stop()
  await helia.stop()
}

async function dht (cidText, addr) {
  const service = kadDHT({
    protocol: '/ipfs/kad/1.0.0',
    clientMode: true,
    peerInfoMapper: (info) => info // loopback addresses are all there is here
  })
  const helia = await startHelia({}, { dht: service })
  const signal = AbortSignal.timeout(TIMEOUT_MS)
  await helia.libp2p.dial(multiaddr(addr), { signal })
  const providers = []
  for await (const provider of helia.libp2p.contentRouting.findProviders(CID.parse(cidText), { signal })) {
    providers.push({ id: provider.id.toString(), addrs: provider.multiaddrs.map(String) })
    break
  }
  console.log(JSON.stringify({ providers }))
  await helia.stop()
}

async function writeTree (helia, root, out, signal) {
  const fs = unixfs(helia)
  const counts = { files: 0, bytes: 0 }

  async function walk (cid, path) {
    const stat = await fs.stat(cid, { signal })
    if (stat.type === 'directory') {
      await mkdir(path, { recursive: true })
      for await (const entry of fs.ls(cid, { signal })) {
        await walk(entry.cid, join(path, entry.name))
      }
      return
    }
    const sink = createWriteStream(path)
    const count = new Writable({
      write (chunk, _encoding, callback) {
        counts.bytes += chunk.byteLength
        sink.write(chunk, callback)
      },
      final (callback) { sink.end(callback) }
    })
    await pipeline(fs.cat(cid, { signal }), count)
    counts.files += 1
  }

  await walk(root, out)
  return counts
}

const [mode, ...args] = process.argv.slice(2)
try {
  if (mode === 'add' && args.length >= 1) {
    await add(args[0], args[1])
  } else if (mode === 'fetch' && args.length === 3) {
    await fetch(args[0], args[1], args[2])
  } else if (mode === 'routed' && args.length === 3) {
    await routed(args[0], args[1], args[2])
  } else if (mode === 'car' && args.length === 3) {
    await car(args[0], args[1], args[2])
  } else if (mode === 'dht' && args.length === 2) {
    await dht(args[0], args[1])
  } else {
    console.error('usage: node peer.mjs add DIR [helia|kubo|kubo-v1] | fetch CID MULTIADDR OUT | ' +
      'routed CID URL OUT | car URL CID OUT | dht CID MULTIADDR')
    process.exit(2)
  }
  process.exit(0)
} catch (err) {
  console.error(`helia peer ${mode} failed: ${err.stack ?? err}`)
  process.exit(1)
}
