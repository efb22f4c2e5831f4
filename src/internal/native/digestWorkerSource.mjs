// The digest worker started from the TypeScript sources (tests, `npm run multifd`): Node 20 does not apply the
// parent's TypeScript loader (tsx) to a worker's entry point, so this plain module registers tsx in the worker
// thread and then loads digestWorker.ts. The compiled library and the bundled command start digestWorker.js.
import { register } from "tsx/esm/api"

register()
await import("./digestWorker.ts")
