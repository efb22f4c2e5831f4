/**
 * `.ci/install-qemu.sh` takes the Debian mirror for backports from the machine's apt configuration only
 * (`.ci/apt-sources.sh`, which it sources): the functions run here on temporary apt configuration directories,
 * so nothing is installed and nothing under /etc is read. And the script guesses no mirror host of its own.
 */
import { describe, expect, it } from "@effect/vitest"
import * as ChildProcess from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { afterAll } from "vitest"
import * as Qemu from "./support/qemu.js"

const CI = Path.join(import.meta.dirname, "..", ".ci")
const SOURCES = Path.join(CI, "apt-sources.sh")
const INSTALL = Path.join(CI, "install-qemu.sh")

const root = Fs.mkdtempSync(Path.join(Os.tmpdir(), "emfd-apt-"))
afterAll(() => Fs.rmSync(root, { recursive: true, force: true }))

let dirs = 0
/** A fresh apt configuration directory: `sources.list` and files of `sources.list.d`, by name. */
const aptDir = (files: { readonly list?: string; readonly parts?: Record<string, string> }): string => {
  const etc = Path.join(root, `etc-${++dirs}`)
  Fs.mkdirSync(Path.join(etc, "sources.list.d"), { recursive: true })
  if (files.list !== undefined) Fs.writeFileSync(Path.join(etc, "sources.list"), files.list)
  for (const [name, text] of Object.entries(files.parts ?? {})) Fs.writeFileSync(Path.join(etc, "sources.list.d", name), text)
  return etc
}

/** Runs a function of apt-sources.sh; its stdout, and whether it succeeded. */
const call = (fn: string, ...args: ReadonlyArray<string>) => {
  const result = ChildProcess.spawnSync("bash", ["-c", `. "$0" && ${fn} "$@"`, SOURCES, ...args], {
    encoding: "utf8",
    timeout: 10_000
  })
  if (result.error !== undefined) throw result.error
  expect(result.stderr).toBe("")
  return { stdout: result.stdout, ok: result.status === 0 }
}
const mirror = (etc: string, suite = "bookworm") => call("apt_mirror_for", etc, suite).stdout.trim()

// the machine this was written on: deb822, snapshot comments, security on its own URI
const DEBIAN_SOURCES = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
`

describe(".ci/apt-sources.sh (the mirror install-qemu.sh uses)", () => {
  it("deb822 .sources: the URI of the first enabled deb stanza carrying the release", () => {
    expect(call("apt_sources", aptDir({ parts: { "debian.sources": DEBIAN_SOURCES } })).stdout).toBe(
      "http://mirror.example.org/debian bookworm\n" +
        "http://mirror.example.org/debian bookworm-updates\n" +
        "http://mirror.example.org/debian-security bookworm-security\n"
    )
    expect(mirror(aptDir({ parts: { "debian.sources": DEBIAN_SOURCES } }))).toBe("http://mirror.example.org/debian")
    // disabled and deb-src stanzas do not count; field names in any case, values continued on the next line,
    // several URIs, a trailing slash, CRLF line ends
    const tricky = [
      "Types: deb",
      "URIs: http://disabled.example.org/debian",
      "Suites: bookworm",
      "Enabled: no",
      "",
      "Types: deb-src",
      "URIs: http://sources.example.org/debian",
      "Suites: bookworm",
      "",
      "types: deb deb-src",
      "uris:",
      " https://first.example.org/debian/",
      " https://second.example.org/debian",
      "suites: bookworm-updates",
      "  bookworm",
      "components: main"
    ].join("\r\n")
    expect(mirror(aptDir({ parts: { "tricky.sources": tricky } }))).toBe("https://first.example.org/debian")
  })

  it("one-line sources.list and sources.list.d/*.list: options in brackets, comments and deb-src skipped", () => {
    const list = [
      "# deb http://commented.example.org/debian bookworm main",
      "deb-src http://sources.example.org/debian bookworm main",
      "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example.org/debian/ bookworm main",
      ""
    ].join("\n")
    expect(mirror(aptDir({ list }))).toBe("http://one.example.org/debian")
    expect(mirror(aptDir({ parts: { "mirror.list": "deb [ arch=amd64 trusted=yes ] http://two.example.org/debian bookworm main\n" } })))
      .toBe("http://two.example.org/debian")
    // apt's order: sources.list before sources.list.d
    expect(mirror(aptDir({ list, parts: { "debian.sources": DEBIAN_SOURCES } }))).toBe("http://one.example.org/debian")
  })

  it("no source for the release: no mirror (install-qemu.sh then skips QEMU and says why)", () => {
    expect(mirror(aptDir({}))).toBe("")
    const others = aptDir({
      parts: {
        "security.sources": DEBIAN_SOURCES.split("\n\n")[1]!,
        "nodesource.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n",
        "old.list.disabled": "deb http://disabled.example.org/debian bookworm main\n"
      }
    })
    expect(mirror(others)).toBe("")
    expect(mirror(aptDir({ parts: { "debian.sources": DEBIAN_SOURCES } }), "trixie")).toBe("")
  })

  it("a backports source already configured is seen (install-qemu.sh then adds none)", () => {
    const plain = aptDir({ parts: { "debian.sources": DEBIAN_SOURCES } })
    expect(call("apt_has_suite", plain, "bookworm-backports").ok).toBe(false)
    const withBackports = aptDir({
      parts: { "debian.sources": DEBIAN_SOURCES.replace("bookworm bookworm-updates", "bookworm bookworm-updates bookworm-backports") }
    })
    expect(call("apt_has_suite", withBackports, "bookworm-backports").ok).toBe(true)
  })

  it("install-qemu.sh names no mirror host of its own and reads the mirror through apt-sources.sh", () => {
    const script = Fs.readFileSync(INSTALL, "utf8")
    expect(script).not.toMatch(/https?:\/\//)
    expect(script).toContain('. "$(dirname "$0")/apt-sources.sh"')
    expect(script).toContain("apt_mirror_for /etc/apt")
  })

  const qemu = Qemu.probe()
  it.skipIf("missing" in qemu)("with QEMU 10 installed, install-qemu.sh installs nothing and says so", () => {
    const result = ChildProcess.spawnSync("bash", [INSTALL], { encoding: "utf8", timeout: 30_000 })
    expect(result.status).toBe(0)
    expect(result.stdout).toMatch(/^install-qemu: QEMU emulator version 1\d.* already installed\n$/)
  })
})
