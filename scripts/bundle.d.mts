import type { BuildOptions } from "esbuild"

/** esbuild options of every bundle of ours. */
export declare const bundleOptions: BuildOptions
/** The command and its workers' modules, from the repository at `root`. */
export declare const commandEntryPoints: (root: string) => Record<"multifd" | "digestWorker" | "channelWorker", string>
