// A channel thread started from the TypeScript sources (tests, `npm run multifd`): Node 20 does not apply the
// parent's TypeScript loader (tsx) to a worker's entry point, so this plain module registers tsx in the thread
// and then loads channelWorker.ts. The compiled library, the bundled command and the benchmark peers start
// the bundled channelWorker.js.
import { register } from "tsx/esm/api"

register()
await import("./channelWorker.ts")
