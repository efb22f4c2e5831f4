/**
 * The README works the first time: its library snippet is `examples/library.ts`, and the scripts it tells a
 * new user to run (`scripts/make-image.mjs`, `scripts/make-credentials.sh`) make an image and credentials that
 * the command line then migrates with, over x509 with client certificates and over PSK.
 */
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import { killChildren, ROOT, run, runHere, startRecv } from "./support/cli.js"
import * as Qemu from "./support/qemu.js"

let dir: string

beforeAll(() => {
  dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "multifd-readme-"))
})

afterEach(killChildren)

afterAll(() => {
  Fs.rmSync(dir, { recursive: true, force: true })
})

const readme = () => Fs.readFileSync(Path.join(ROOT, "README.md"), "utf8")

describe("README", () => {
  it("its library snippet is exactly examples/library.ts", () => {
    const text = readme()
    const section = text.slice(text.indexOf("\n## Library"))
    const snippet = /```ts\n([\s\S]*?)```/.exec(section)
    expect(snippet).not.toBeNull()
    expect(snippet![1]).toBe(Fs.readFileSync(Path.join(ROOT, "examples", "library.ts"), "utf8"))
  })

  it("scripts/make-image.mjs and scripts/make-credentials.sh make what the README's commands migrate", async () => {
    const image = Path.join(dir, "guest.img")
    const credentials = Path.join(dir, "credentials")
    ChildProcess.execFileSync(process.execPath, [Path.join(ROOT, "scripts", "make-image.mjs"), image, "8M"], { stdio: "pipe" })
    expect(Fs.statSync(image).size).toBe(8 * 1024 * 1024)
    ChildProcess.execFileSync("bash", [Path.join(ROOT, "scripts", "make-credentials.sh"), credentials], { stdio: "pipe" })
    const file = (name: string) => Path.join(credentials, name)

    // x509: the destination admits only CN=alice, whose certificate make-credentials.sh issued
    const x509Out = Path.join(dir, "x509.img")
    const recv = await startRecv([
      "tcp:localhost:0", "--out", x509Out, "--tls-cert", file("server-cert.pem"), "--tls-key", file("server-key.pem"),
      "--tls-ca", file("ca-cert.pem"), "--tls-authz", "alice"
    ])
    const send = await run([
      "send", recv.uri, "--in", image, "--channels", "4", "--tls-ca", file("ca-cert.pem"),
      "--tls-cert", file("client-cert.pem"), "--tls-key", file("client-key.pem")
    ])
    const received = await recv.finished
    expect({ send: send.code, recv: received.code, stderr: send.stderr + received.stderr }).toMatchObject({ send: 0, recv: 0 })
    expect(Fs.readFileSync(x509Out).equals(Fs.readFileSync(image))).toBe(true)

    // PSK, with the JSON statistics a script reads
    const pskOut = Path.join(dir, "psk.img")
    const pskRecv = await startRecv(["tcp:127.0.0.1:0", "--out", pskOut, "--tls-psk", file("keys.psk")])
    const pskSend = await run(["send", pskRecv.uri, "--in", image, "--tls-psk", file("keys.psk"), "--json"])
    expect((await pskRecv.finished).code).toBe(0)
    expect(pskSend.code).toBe(0)
    expect(JSON.parse(pskSend.stdout)).toMatchObject({ role: "send", ramBytes: 8 * 1024 * 1024 })
    expect(Fs.readFileSync(pskOut).equals(Fs.readFileSync(image))).toBe(true)
  })

  it("the Command line section's commands, as written, make an image and credentials and migrate them", async () => {
    // the section's sh blocks, each command a line (continuations joined, comments dropped), in a fresh directory:
    // the set-up commands run as they are (a smaller image), every recv with the send after it (the last recv
    // with the send before it), `npm run multifd --` being the command, and port 4444 the one recv listens on
    const text = readme()
    const section = text.slice(text.indexOf("\n## Command line"), text.indexOf("\nSnapshots and QEMU:"))
    const commands = [...section.matchAll(/```sh\n([\s\S]*?)```/g)].flatMap((block) =>
      block[1]!.replace(/\\\n\s*/g, " ").split("\n").map((line) => line.replace(/\s+#.*$/, "").trim()).filter((l) => l !== "")
    )
    const words = (line: string) => [...line.matchAll(/'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2]!)
    const cwd = Path.join(dir, "command-line")
    Fs.mkdirSync(cwd)
    const setup = commands.filter((c) => !c.startsWith("npm run multifd -- "))
    expect(setup.map((c) => words(c).slice(0, 2).join(" "))).toEqual(["node scripts/make-image.mjs", "bash scripts/make-credentials.sh"])
    for (const command of setup) {
      const [program, script, ...args] = words(command)
      ChildProcess.execFileSync(program === "node" ? process.execPath : program!, [
        Path.join(ROOT, script!),
        ...args.map((a) => (a === "256M" ? "8M" : a))
      ], { cwd, stdio: "pipe" })
    }
    const migrations = commands.filter((c) => c.startsWith("npm run multifd -- ")).map((c) => words(c).slice(4))
    let pairs = 0
    for (const [i, recvArgs] of migrations.entries()) {
      if (recvArgs[0] !== "recv") continue
      const sendArgs = migrations[i + 1]?.[0] === "send" ? migrations[i + 1]! : migrations[i - 1]!
      expect(sendArgs[0]).toBe("send")
      const recv = await startRecv(recvArgs.slice(1).map((a) => a.replace(/:4444$/, ":0")), { cwd })
      const port = /:(\d+)$/.exec(recv.uri)![1]!
      const send = await run(sendArgs.map((a) => a.replace(/:4444$/, `:${port}`)), { cwd })
      const received = await recv.finished
      expect({ recv: recvArgs, send: send.code, received: received.code, stderr: send.stderr + received.stderr })
        .toMatchObject({ send: 0, received: 0 })
      const out = recvArgs[recvArgs.indexOf("--out") + 1]!
      expect(Fs.readFileSync(Path.join(cwd, out)).equals(Fs.readFileSync(Path.join(cwd, "guest.img")))).toBe(true)
      Fs.rmSync(Path.join(cwd, out))
      pairs++
    }
    expect(pairs).toBe(4)
  })

  it("the Snapshots section's file: commands, as written, save a snapshot and restore the image from it", async () => {
    // its first sh block's send and recv of a file: snapshot (in this process), /var/tmp and the working directory
    // being a fresh directory
    const text = readme()
    const section = text.slice(text.indexOf("\nSnapshots and QEMU:"))
    const block = /```sh\n([\s\S]*?)```/.exec(section)![1]!
    const commands = block.split("\n").map((line) => line.replace(/\s+#.*$/, "").trim())
      .filter((line) => line.startsWith("npm run multifd -- ") && / file:/.test(line))
    expect(commands.map((c) => c.split(/\s+/).slice(4, 6).join(" "))).toEqual(["send file:/var/tmp/guest.snap", "recv file:/var/tmp/guest.snap"])
    const cwd = Path.join(dir, "snapshots")
    Fs.mkdirSync(cwd)
    const image = Path.join(cwd, "guest.img")
    ChildProcess.execFileSync(process.execPath, [Path.join(ROOT, "scripts", "make-image.mjs"), image, "1M"], { stdio: "pipe" })
    const here = (word: string) =>
      word.startsWith("file:/var/tmp/") ? `file:${Path.join(cwd, word.slice("file:/var/tmp/".length))}` : word.endsWith(".img") ? Path.join(cwd, word) : word
    for (const command of commands) {
      const args = command.split(/\s+/).slice(4).map(here)
      const result = await runHere(args)
      expect({ args, code: result.code, stderr: result.stderr }).toMatchObject({ args, code: 0 })
    }
    expect(Fs.readFileSync(Path.join(cwd, "restored.img")).equals(Fs.readFileSync(image))).toBe(true)
  })

  // `npm run multifd -- … --json` printed npm's own two lines on stdout before the JSON: a script's JSON parser
  // failed on "> effect-multifd@0.1.0 multifd"
  it("the README's way to run the command for a script that reads --json gives stdout with the JSON object alone", async () => {
    const way = /`(npm run -s multifd --) <args>`/.exec(readme())
    expect(way).not.toBeNull()
    const image = Path.join(dir, "json.img")
    Fs.writeFileSync(image, Buffer.alloc(64 * 1024, 1))
    const [npm, ...args] = way![1]!.split(" ")
    const ran = ChildProcess.spawnSync(npm!, [...args, "send", `file:${Path.join(dir, "json.snap")}`, "--in", image, "--json"], {
      cwd: ROOT,
      encoding: "utf8",
      timeout: 60_000,
      env: { ...process.env, NO_COLOR: "1", npm_config_update_notifier: "false" }
    })
    expect({ code: ran.status, stderr: ran.stderr }).toMatchObject({ code: 0 })
    expect(JSON.parse(ran.stdout)).toMatchObject({ role: "send", ramBytes: 64 * 1024 })
  })

  it("what the README's commands write in the repository (images, credentials with private keys) git ignores", () => {
    const written = ["guest.img", "received.img", "r.img", "restored.img", "credentials/keys.psk", "credentials/ca-key.pem"]
    const ignored = ChildProcess.spawnSync("git", ["check-ignore", "--no-index", ...written], { cwd: ROOT, encoding: "utf8" })
    expect(ignored.stdout.split("\n").filter((l) => l !== "")).toEqual(written)
  })

  const qemu = Qemu.probe()
  it.skipIf("missing" in qemu)("scripts/make-credentials.sh makes certificates that QEMU's tls-creds-x509 loads, as the README says", () => {
    const credentials = Path.join(dir, "qemu-credentials")
    ChildProcess.execFileSync("bash", [Path.join(ROOT, "scripts", "make-credentials.sh"), credentials], { stdio: "pipe" })
    for (const endpoint of ["server", "client"]) {
      // QEMU checks the certificates when the object is created, at start; then QMP quits it
      const qemu = ChildProcess.spawnSync(Qemu.QEMU_BINARY, [
        "-machine", "none", "-nodefaults", "-display", "none", "-S",
        "-object", `tls-creds-x509,id=tls0,endpoint=${endpoint},dir=${credentials},verify-peer=on`,
        "-qmp", "stdio"
      ], { input: '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', encoding: "utf8", timeout: 20_000 })
      expect({ endpoint, status: qemu.status, stderr: qemu.stderr }).toEqual({ endpoint, status: 0, stderr: "" })
    }
  })
})
