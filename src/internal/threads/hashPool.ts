/**
 * A digest's hashers on channel threads (the owner's side of `hashSession`): a source whose channels run on
 * the pool hashes there after the last round (its channels are idle then) instead of on digest threads of its
 * own, each of which would be one more isolate in memory.
 *
 * @internal
 */
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Digest from "../native/digest.js"
import type * as HashRequest from "../native/hashRequest.js"
import * as Xxh3 from "../native/xxh3.js"
import * as HashSession from "./hashSession.js"
import type * as ThreadPool from "./pool.js"

/** A hasher on a channel thread of `threads` (a hash session, closed with the scope). */
const hasher = (threads: ThreadPool.Pool): Effect.Effect<Digest.Hasher, never, Scope.Scope> =>
  Effect.map(
    threads.open<HashSession.In, HashSession.Out>(HashSession.KIND, {
      module: Xxh3.module(),
      scratch: Digest.SLICE
    } satisfies HashSession.Data),
    (session): Digest.Hasher => {
      const failed = (reason: string) =>
        new Digest.WorkerFailed({ reason: `on channel thread ${session.thread}: ${reason}` })
      /** The answer to request `id`: an interrupted request's late answer is passed over. */
      const answerTo = (id: number): Effect.Effect<HashRequest.Answer, Digest.WorkerFailed> =>
        Effect.flatMap(
          Effect.mapError(session.receive, (error) => failed(error.message)),
          (event) =>
            event._tag === "Ended"
              ? Effect.fail(failed("the hash session ended"))
              : event.message.id === id
              ? Effect.succeed(event.message)
              : answerTo(id)
        )
      // a thread held up (a loop, a long synchronous task) never answers: the digest, and a migration hashing (its
      // Hashing heartbeats keeping the peer waiting), waited for ever. A chunk unanswered for as long as the pool takes
      // a thread for hung (its closeTimeout, 10 s by default: a 64 MiB chunk takes tens of milliseconds) fails the
      // digest; the session's close, unanswered as well, then terminates the thread (`pool`)
      const hung = failed(`stopped answering: a chunk had no answer after ${Duration.format(threads.closeTimeout)}`)
      return {
        hash: (chunk) =>
          Effect.suspend(() => {
            const request = Digest.requestFor(chunk)
            return Effect.zipRight(
              session.send(request),
              Effect.map(
                Effect.timeoutFail(answerTo(request.id), { duration: threads.closeTimeout, onTimeout: () => hung }),
                (answer) => Xxh3.finish(answer.accumulators, chunk.bytes)
              )
            )
          })
      }
    }
  )

/** `count` hash sessions on the channel threads of `threads` as a digest's pool, closed when the scope closes. */
export const poolOn = (threads: ThreadPool.Pool, count: number): Effect.Effect<Digest.Pool, never, Scope.Scope> =>
  Effect.flatMap(
    Effect.forEach(Array.from({ length: count }), () => hasher(threads)),
    Digest.poolOf
  )
