/**
 * The TLS record layer of a byte stream as a proxy on the wire sees it: each record's 5-byte cleartext header
 * (type, length) followed through the chunks a socket delivers.
 */
/** Follows TLS records (5-byte cleartext headers) through a byte stream, chunk by chunk. */
export class TlsRecords {
  private readonly header = Buffer.alloc(5)
  private have = 0
  /** Bytes of the current record's body still to come. */
  private left = 0

  /** Whether the stream so far ends between records: no record header or body torn. */
  get atRecordBoundary(): boolean {
    return this.have === 0 && this.left === 0
  }

  /**
   * Calls `onRecord` for each record whose header ends in `chunk`: its type, its body's length, and where in
   * `chunk` its body begins (maybe at its end: the body is in the next chunk).
   */
  scan(chunk: Buffer, onRecord: (type: number, length: number, bodyAt: number) => void): void {
    let i = 0
    while (i < chunk.length) {
      if (this.left > 0) {
        const n = Math.min(this.left, chunk.length - i)
        this.left -= n
        i += n
        continue
      }
      this.header[this.have++] = chunk[i++]!
      if (this.have === 5) {
        this.left = this.header.readUInt16BE(3)
        this.have = 0
        onRecord(this.header[0]!, this.left, i)
      }
    }
  }
}
