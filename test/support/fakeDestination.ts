/**
 * A fake destination on a real listener, for source tests that need a destination's answers of their own
 * making: it reads the control magic and the hello, accepts (saying it hears heartbeats with `heartbeats`, as
 * this library's destinations do), reads every multifd channel and throws the bytes away, answers each flush
 * (`onFlush`, by default `FlushAck` at once) and `Complete` (`onComplete`, by default `Done`). It runs in a fiber
 * of the caller's scope until the source goes away.
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Control from "../../src/Control.js"
import * as Transport from "../../src/Transport.js"

/** How the fake answers: each gets the main channel; `onFlush` also the flush and its number among them. */
export interface FakeDestinationPlan {
  readonly heartbeats?: boolean | undefined
  /** Says in its Accept that it understands the source's `Bye`. */
  readonly bye?: boolean | undefined
  /** Sees every message after the hello. */
  readonly onMessage?: ((message: Control.Message) => void) | undefined
  readonly onHello?: ((hello: Control.Hello) => void) | undefined
  readonly onFlush?:
    | ((control: Transport.Connection, flush: Control.Flush, index: number) => Effect.Effect<void, Transport.TransportError>)
    | undefined
  readonly onComplete?: ((control: Transport.Connection) => Effect.Effect<void, Transport.TransportError>) | undefined
}

const tcp0: Transport.Address = { _tag: "Tcp", host: "127.0.0.1", port: 0 }

/** Reads a connection to its end (or failure), throwing the bytes away. */
const drain = (connection: Transport.Connection): Effect.Effect<void> =>
  Effect.forever(connection.read(64)).pipe(Effect.ignore)

/** Starts the fake; yields the address a source connects to. */
export const fakeDestination = (plan: FakeDestinationPlan = {}): Effect.Effect<Transport.Address, Transport.TransportError, Scope.Scope> =>
  Effect.gen(function*() {
    const listener = yield* Transport.listen(tcp0)
    const fake = Effect.gen(function*() {
      const control = yield* listener.accept
      yield* control.read(4)
      const hello = (yield* Control.receive(control)) as Control.Hello
      plan.onHello?.(hello)
      yield* Control.send(
        control,
        new Control.Accept({
          ...(plan.heartbeats === true ? { heartbeats: true } : {}),
          ...(plan.bye === true ? { bye: true } : {})
        })
      )
      for (let i = 0; i < hello.channels; i++) yield* Effect.forkScoped(drain(yield* listener.accept))
      let flushes = 0
      while (true) {
        const message = yield* Control.receive(control)
        plan.onMessage?.(message)
        if (message._tag === "Flush") {
          if (plan.onFlush !== undefined) yield* plan.onFlush(control, message, flushes)
          flushes++
          yield* Control.send(control, new Control.FlushAck({ round: message.round }))
        }
        if (message._tag === "Complete") {
          yield* plan.onComplete === undefined ? Control.send(control, new Control.Done()) : plan.onComplete(control)
        }
      }
    }).pipe(Effect.ignore, Effect.scoped)
    yield* Effect.forkScoped(fake)
    return listener.address
  })
