/**
 * The npm package as a user gets it: `npm pack` (which builds `dist/` on `prepare`), the tarball installed into
 * an empty project, the library imported by its name under plain `node` (a real migration over loopback,
 * digests on worker threads), the bundled command's digest worker, a TypeScript consumer type-checked against
 * the published declarations, and `npx multifd --help`.
 *
 * The package is packed from a copy of the sources in a temporary directory, so that this test never rebuilds
 * the repository's own `dist/` under the feet of anything else. Where that `dist/` is newer than every input of the
 * build (as make judges it: `npm ci` builds it on `prepare`, from these sources), the copy takes it and is packed
 * without building again (a type check and two bundles: 20 CPU-seconds here); else the copy is built as `npm pack`
 * builds it.
 */
import * as ChildProcess from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"

const ROOT = Path.resolve(import.meta.dirname, "..")
const NPM = process.platform === "win32" ? "npm.cmd" : "npm"

interface Ran {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/** Runs a command to its end (asynchronously: a blocked event loop would stall the test runner's messages). */
const run = (command: string, args: ReadonlyArray<string>, cwd: string, timeoutMs = 240_000): Promise<Ran> =>
  new Promise((resolve) => {
    const child = ChildProcess.spawn(command, args, {
      cwd,
      timeout: timeoutMs,
      killSignal: "SIGKILL",
      env: { ...process.env, NO_COLOR: "1", npm_config_update_notifier: "false", npm_config_fund: "false" }
    })
    let stdout = ""
    let stderr = ""
    child.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s))
    child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s))
    child.once("close", (code) => resolve({ code, stdout, stderr }))
  })

const ok = async (running: Promise<Ran>, what: string): Promise<Ran> => {
  const ran = await running
  if (ran.code !== 0) throw new Error(`${what} exited ${ran.code}:\n${ran.stdout}\n${ran.stderr}`)
  return ran
}

/** The newest modification time of `path`'s files (a file's own, or those under a directory), in ms. */
const newest = (path: string): number => {
  const stat = Fs.statSync(path)
  if (!stat.isDirectory()) return stat.mtimeMs
  return Math.max(0, ...Fs.readdirSync(path).map((name) => newest(Path.join(path, name))))
}

/** The oldest modification time of the files under `dir`, in ms (Infinity for none). */
const oldest = (dir: string): number =>
  Math.min(
    Infinity,
    ...Fs.readdirSync(dir, { withFileTypes: true }).map((entry) =>
      entry.isDirectory() ? oldest(Path.join(dir, entry.name)) : Fs.statSync(Path.join(dir, entry.name)).mtimeMs
    )
  )

/** What the build (scripts/build.mjs) reads, beside node_modules. */
const BUILD_INPUTS = ["package.json", "package-lock.json", "tsconfig.json", "tsconfig.build.json", "src", "scripts"]

/** Whether the repository's `dist/` was built after its inputs last changed (the build removes it first). */
const distIsFresh = (): boolean => {
  const dist = Path.join(ROOT, "dist")
  if (!Fs.existsSync(Path.join(dist, "index.js")) || !Fs.existsSync(Path.join(dist, "bin", "multifd.js"))) return false
  return oldest(dist) > Math.max(...BUILD_INPUTS.map((entry) => newest(Path.join(ROOT, entry))))
}

let work: string
let packed: ReadonlyArray<string>
let consumer: string

beforeAll(async () => {
  work = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-package-"))
  // a copy of what `npm pack` reads, with the repository's node_modules for the build tools
  const source = Path.join(work, "source")
  Fs.mkdirSync(source)
  for (const entry of ["package.json", "package-lock.json", "tsconfig.json", "tsconfig.build.json", "README.md", "src", "scripts", "docs"]) {
    Fs.cpSync(Path.join(ROOT, entry), Path.join(source, entry), { recursive: true })
  }
  Fs.symlinkSync(Path.join(ROOT, "node_modules"), Path.join(source, "node_modules"), "dir")
  const built = distIsFresh()
  if (built) Fs.cpSync(Path.join(ROOT, "dist"), Path.join(source, "dist"), { recursive: true })
  const pack = await ok(
    run(NPM, ["pack", "--json", "--pack-destination", work, ...(built ? ["--ignore-scripts"] : [])], source),
    "npm pack"
  )
  const [info] = JSON.parse(pack.stdout.slice(pack.stdout.indexOf("["))) as Array<
    { readonly filename: string; readonly files: ReadonlyArray<{ readonly path: string }> }
  >
  packed = info!.files.map((f) => f.path)

  consumer = Path.join(work, "consumer")
  Fs.mkdirSync(consumer)
  Fs.writeFileSync(Path.join(consumer, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }))
  // the registry's packages come from npm's cache where it has them (`npm ci` filled it); install scripts are
  // not needed here (without the native zstd build, zstd reports itself unavailable, which is tested elsewhere)
  await ok(
    run(NPM, ["install", "--prefer-offline", "--ignore-scripts", "--no-audit", "--no-fund", Path.join(work, info!.filename)], consumer),
    "npm install of the tarball"
  )
}, 300_000)

afterAll(() => {
  if (work !== undefined) Fs.rmSync(work, { recursive: true, force: true })
})

describe("the npm package", () => {
  it("ships the compiled library, its declarations and the command, and no tests, keys or benchmarks", () => {
    for (
      const file of [
        "dist/index.js",
        "dist/index.d.ts",
        "dist/Migration.js",
        "dist/Migration.d.ts",
        "dist/internal/native/digestWorker.js",
        "dist/bin/multifd.js",
        "dist/bin/digestWorker.js",
        "README.md"
      ]
    ) {
      expect(packed).toContain(file)
    }
    const stray = packed.filter((f) => /^(test|bench|examples|\.ci)\/|\.(psk|pem)$|^src\/cli\//.test(f))
    expect(stray).toEqual([])
  })

  it("asks a consumer for exactly the packages its library imports (dependencies and peer dependencies)", () => {
    // a peer dependency the library never imports still binds the consumer to its version range: a project on
    // another minor of it (an @effect/platform 0.98, say) could not install the package at all (npm's ERESOLVE)
    const installed = Path.join(consumer, "node_modules", "effect-multifd")
    const manifest = JSON.parse(Fs.readFileSync(Path.join(installed, "package.json"), "utf8")) as {
      readonly dependencies?: Record<string, string>
      readonly peerDependencies?: Record<string, string>
    }
    const imported = new Set<string>()
    const scan = (dir: string): void => {
      for (const entry of Fs.readdirSync(dir, { withFileTypes: true })) {
        const file = Path.join(dir, entry.name)
        // the command's bundle carries its own dependencies inside (zstd-napi aside, which the library loads too)
        if (entry.isDirectory()) {
          if (file !== Path.join(installed, "dist", "bin")) scan(file)
          continue
        }
        if (!entry.name.endsWith(".js")) continue
        const text = Fs.readFileSync(file, "utf8")
        const specifiers = [
          ...text.matchAll(/^\s*(?:import|export)\b[^"'\n;]*?\bfrom\s*["']([^"']+)["']/gm),
          ...text.matchAll(/^\s*import\s*["']([^"']+)["']/gm),
          ...text.matchAll(/\bimport\(\s*["']([^"']+)["']\s*\)/g),
          ...text.matchAll(/\bcreateRequire\([^)]*\)\(\s*["']([^"']+)["']\s*\)/g)
        ].map((m) => m[1]!)
        for (const specifier of specifiers) {
          if (specifier.startsWith(".") || specifier.startsWith("node:") || specifier === "effect-multifd") continue
          const parts = specifier.split("/")
          imported.add(specifier.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0]!)
        }
      }
    }
    scan(Path.join(installed, "dist"))
    const asked = [...Object.keys(manifest.dependencies ?? {}), ...Object.keys(manifest.peerDependencies ?? {})]
    expect([...imported].sort()).toEqual([...new Set(asked)].sort())
  })

  it("imports by name under plain node and migrates 4 MiB over loopback", async () => {
    const script = `
      import * as Effect from "effect/Effect"
      import { GuestRam, Migration, Transport } from "effect-multifd"
      import * as Protocol from "effect-multifd/Protocol"
      const program = Effect.gen(function*() {
        const transport = yield* Transport.Transport
        const listener = yield* transport.listen({ _tag: "Tcp", host: "127.0.0.1", port: 0 })
        const [stats, received] = yield* Effect.all([
          Migration.migrate({ address: listener.address, channels: 2 }),
          Migration.incoming(listener)
        ], { concurrency: "unbounded" })
        const source = (yield* GuestRam.GuestRam).blocks[0].bytes
        const same = Buffer.compare(source, received.ram.blocks[0].bytes) === 0
        console.log(JSON.stringify({ ramBytes: stats.ramBytes, same, magic: Protocol.MAGIC }))
      })
      const memory = GuestRam.layer({ blocks: [{ name: "pc.ram", size: 4 * 1024 * 1024 }] })
      Effect.runPromise(program.pipe(Effect.scoped, Effect.provide([Transport.layer, memory])))
    `
    const file = Path.join(consumer, "consume.mjs")
    Fs.writeFileSync(file, script)
    const ran = await ok(run(process.execPath, [file], consumer, 60_000), "node consume.mjs")
    expect(JSON.parse(ran.stdout.trim())).toEqual({ ramBytes: 4 * 1024 * 1024, same: true, magic: 0x11223344 })
  })

  it("digests on worker threads started from the compiled library (dist/internal/native/digestWorker.js)", async () => {
    // three chunks, hashed by this thread and a pool of two workers, and again by this thread alone (plain
    // memory is never given to workers): both must agree. The pool comes from the internal module itself, so
    // that workers are used however many cores the machine has.
    const script = `
      import * as Effect from "effect/Effect"
      import * as Crypto from "node:crypto"
      import { GuestRam } from "effect-multifd"
      const Digest = await import(new URL("./node_modules/effect-multifd/dist/internal/native/digest.js", import.meta.url).href)
      const size = 2 * GuestRam.DIGEST_CHUNK + 4096
      const shared = GuestRam.allocate(size)
      for (let at = 0; at < size; at += 65536) Crypto.randomFillSync(shared, at, Math.min(65536, size - at))
      const onWorkers = Effect.scoped(Effect.flatMap(Digest.pool(2), (pool) => Digest.digestAll([shared], pool)))
      const here = Effect.flatMap(GuestRam.make({ blocks: [{ name: "mem", bytes: Uint8Array.from(shared) }] }), GuestRam.digest)
      const [[workers], [alone]] = await Effect.runPromise(Effect.all([onWorkers, here]))
      console.log(JSON.stringify({ same: workers === alone.digest, length: workers.length }))
    `
    const file = Path.join(consumer, "digest.mjs")
    Fs.writeFileSync(file, script)
    const ran = await ok(run(process.execPath, [file], consumer, 60_000), "node digest.mjs")
    expect(JSON.parse(ran.stdout.trim())).toEqual({ same: true, length: 64 })
  })

  it("the bundled command's digests run on its worker (dist/bin/digestWorker.js): a snapshot saved and restored", async () => {
    // two chunks of shared memory: the digests of save and restore take a worker on any machine with two cores
    const image = Path.join(work, "guest.img")
    const restored = Path.join(work, "restored.img")
    const snapshot = Path.join(work, "guest.snap")
    Fs.writeFileSync(image, Crypto.randomBytes(64 * 1024 * 1024 + 4096))
    const multifd = Path.join(consumer, "node_modules", "effect-multifd", "dist", "bin", "multifd.js")
    await ok(run(process.execPath, [multifd, "send", `file:${snapshot}`, "--in", image], consumer, 60_000), "multifd send file:")
    await ok(run(process.execPath, [multifd, "recv", `file:${snapshot}`, "--out", restored], consumer, 60_000), "multifd recv file:")
    expect(Fs.readFileSync(restored).equals(Fs.readFileSync(image))).toBe(true)
  })

  it("type-checks a TypeScript consumer against the published declarations (and rejects a wrong one)", async () => {
    Fs.writeFileSync(
      Path.join(consumer, "consume.ts"),
      `
      import * as Effect from "effect/Effect"
      import { GuestRam, Migration, Transport } from "effect-multifd"
      import type { Stats } from "effect-multifd/Migration"
      const address: Transport.Address = { _tag: "Unix", path: "/tmp/x.sock" }
      const migration: Effect.Effect<Stats, Migration.MigrateError, Transport.Transport | GuestRam.GuestRam> =
        Migration.migrate({ address, channels: 4, compression: "zstd" })
      // @ts-expect-error: compression is one of none, zlib, zstd
      Migration.migrate({ address, compression: "lz4" })
      export const program = migration.pipe(Effect.map((stats) => stats.gibPerSecond.toFixed(2)))
      `
    )
    Fs.writeFileSync(
      Path.join(consumer, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          target: "ES2022",
          module: "NodeNext",
          moduleResolution: "NodeNext",
          strict: true,
          noEmit: true,
          skipLibCheck: false,
          types: ["node"],
          typeRoots: [Path.join(ROOT, "node_modules", "@types")]
        },
        files: ["consume.ts"]
      })
    )
    // and with the consumer's own @types/node, the one npm installed for it (the newest): the declarations named a
    // type of node:worker_threads that the newest no longer has ("has no exported member 'TransferListItem'")
    const own = JSON.parse(Fs.readFileSync(Path.join(consumer, "tsconfig.json"), "utf8")) as {
      compilerOptions: Record<string, unknown>
    }
    delete own.compilerOptions["typeRoots"]
    Fs.writeFileSync(Path.join(consumer, "tsconfig.own.json"), JSON.stringify(own))
    expect(Fs.existsSync(Path.join(consumer, "node_modules", "@types", "node", "package.json"))).toBe(true)
    // both at once: each checks every declaration file of effect and of the package (skipLibCheck off), 8 CPU-seconds
    const tsc = Path.join(ROOT, "node_modules", "typescript", "bin", "tsc")
    await Promise.all([
      ok(run(process.execPath, [tsc, "-p", "tsconfig.json"], consumer, 240_000), "tsc on the consumer"),
      ok(run(process.execPath, [tsc, "-p", "tsconfig.own.json"], consumer, 240_000), "tsc on the consumer, its own @types/node")
    ])
    // two type checks of 8 CPU-seconds each: a minute was not enough beside the suite's other files on two cores (60 s,
    // the suite's default, ran out in a full run; 25 s alone)
  }, 240_000)

  it("npx multifd --help prints the usage and exits 0", async () => {
    const ran = await ok(run(NPM, ["exec", "--offline", "--", "multifd", "--help"], consumer, 60_000), "npx multifd --help")
    expect(ran.stdout).toContain("multifd")
    expect(ran.stdout).toMatch(/recv/)
    expect(ran.stdout).toMatch(/send/)
  })
})
