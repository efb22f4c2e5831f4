;; XXH3's stripe loop (xxHash 0.8: XXH3_accumulate_512 and XXH3_scrambleAcc, default secret) in WebAssembly
;; SIMD: the part of XXH3-128 that touches every byte of a long input. The rest (the last partial block, the
;; last stripe, the merge, and inputs of at most 240 bytes) is in xxh3.ts, which embeds this module as bytes:
;; `npm run build:wasm` assembles this file (wabt) and writes them there, and test/Digest.test.ts checks that
;; the bytes are this file's.
;;
;; The module hashes in place: it works on the memory it is instantiated with (guest memory from
;; GuestRam.allocate, or a scratch memory that other memory is copied into), and has no memory of its own.
;;
;; XXH3 on an input of more than 240 bytes keeps eight 64-bit accumulators acc[0..7] and goes through the
;; input in blocks of 1024 bytes. A block is 16 stripes of 64 bytes; stripe s (0..15) is folded into the
;; accumulators with the secret read from byte 8*s on (XXH3_accumulate_512, scalar form):
;;
;;   for i in 0..7:
;;     data       = read64le(stripe + 8*i)
;;     key        = data ^ read64le(secret + 8*s + 8*i)
;;     acc[i ^ 1] += data
;;     acc[i]     += (key & 0xFFFFFFFF) * (key >> 32)
;;
;; and after the 16 stripes the accumulators are scrambled with the last 64 bytes of the secret
;; (XXH3_scrambleAcc):
;;
;;   for i in 0..7:
;;     acc[i] = (acc[i] ^ (acc[i] >> 47) ^ read64le(secret + 128 + 8*i)) * PRIME32_1
;;
;; Here each v128 holds two neighbouring accumulators, and a stripe is four 16-byte lanes: lane l (0..3)
;; holds data words 2l and 2l+1 and updates the pair ($acc01, $acc23, $acc45 or $acc67) that those words
;; feed. All arithmetic wraps modulo 2^64, as in C.

(module
  ;; The memory to hash (shared: worker threads hash parts of the same guest memory).
  (import "env" "memory" (memory 0 65536 shared))

  ;; The accumulators acc[0..7]. The caller sets them before `blocks` and reads them after: a long input is
  ;; hashed a slice at a time, and one instance serves every input in its memory.
  (global $acc0 (export "a0") (mut i64) (i64.const 0))
  (global $acc1 (export "a1") (mut i64) (i64.const 0))
  (global $acc2 (export "a2") (mut i64) (i64.const 0))
  (global $acc3 (export "a3") (mut i64) (i64.const 0))
  (global $acc4 (export "a4") (mut i64) (i64.const 0))
  (global $acc5 (export "a5") (mut i64) (i64.const 0))
  (global $acc6 (export "a6") (mut i64) (i64.const 0))
  (global $acc7 (export "a7") (mut i64) (i64.const 0))

  ;; XXH3_kSecret, the default secret (192 bytes), 16 bytes at a time: $secretN holds bytes N..N+15.
  (global $secret0   v128 (v128.const i8x16 0xb8 0xfe 0x6c 0x39 0x23 0xa4 0x4b 0xbe 0x7c 0x01 0x81 0x2c 0xf7 0x21 0xad 0x1c))
  (global $secret16  v128 (v128.const i8x16 0xde 0xd4 0x6d 0xe9 0x83 0x90 0x97 0xdb 0x72 0x40 0xa4 0xa4 0xb7 0xb3 0x67 0x1f))
  (global $secret32  v128 (v128.const i8x16 0xcb 0x79 0xe6 0x4e 0xcc 0xc0 0xe5 0x78 0x82 0x5a 0xd0 0x7d 0xcc 0xff 0x72 0x21))
  (global $secret48  v128 (v128.const i8x16 0xb8 0x08 0x46 0x74 0xf7 0x43 0x24 0x8e 0xe0 0x35 0x90 0xe6 0x81 0x3a 0x26 0x4c))
  (global $secret64  v128 (v128.const i8x16 0x3c 0x28 0x52 0xbb 0x91 0xc3 0x00 0xcb 0x88 0xd0 0x65 0x8b 0x1b 0x53 0x2e 0xa3))
  (global $secret80  v128 (v128.const i8x16 0x71 0x64 0x48 0x97 0xa2 0x0d 0xf9 0x4e 0x38 0x19 0xef 0x46 0xa9 0xde 0xac 0xd8))
  (global $secret96  v128 (v128.const i8x16 0xa8 0xfa 0x76 0x3f 0xe3 0x9c 0x34 0x3f 0xf9 0xdc 0xbb 0xc7 0xc7 0x0b 0x4f 0x1d))
  (global $secret112 v128 (v128.const i8x16 0x8a 0x51 0xe0 0x4b 0xcd 0xb4 0x59 0x31 0xc8 0x9f 0x7e 0xc9 0xd9 0x78 0x73 0x64))
  (global $secret128 v128 (v128.const i8x16 0xea 0xc5 0xac 0x83 0x34 0xd3 0xeb 0xc3 0xc5 0x81 0xa0 0xff 0xfa 0x13 0x63 0xeb))
  (global $secret144 v128 (v128.const i8x16 0x17 0x0d 0xdd 0x51 0xb7 0xf0 0xda 0x49 0xd3 0x16 0x55 0x26 0x29 0xd4 0x68 0x9e))
  (global $secret160 v128 (v128.const i8x16 0x2b 0x16 0xbe 0x58 0x7d 0x47 0xa1 0xfc 0x8f 0xf8 0xb8 0xd1 0x7a 0xd0 0x31 0xce))
  (global $secret176 v128 (v128.const i8x16 0x45 0xcb 0x3a 0x8f 0x95 0x16 0x04 0x28 0xaf 0xd7 0xfb 0xca 0xbb 0x4b 0x40 0x7e))

  ;; Folds the `count` blocks of 1024 bytes that start at `ptr` into the accumulators.
  (func (export "blocks") (param $ptr i32) (param $count i32)
    (local $acc01 v128) (local $acc23 v128) (local $acc45 v128) (local $acc67 v128)
    ;; the secret windows of the current pair of stripes (see the stripe loop)
    (local $s0 v128) (local $s1 v128) (local $s2 v128) (local $s3 v128) (local $s4 v128) (local $s5 v128)
    (local $s6 v128) (local $s7 v128) (local $s8 v128) (local $s9 v128) (local $s10 v128) (local $s11 v128)
    (local $stripe i32)  ;; address of the current (even) stripe
    (local $pairs i32)   ;; pairs of stripes left in the block
    (local $data v128)   ;; a lane of input: two 64-bit words
    (local $key v128)    ;; the lane xor its secret

    ;; the accumulators, two to a register
    (local.set $acc01 (i64x2.replace_lane 1 (i64x2.splat (global.get $acc0)) (global.get $acc1)))
    (local.set $acc23 (i64x2.replace_lane 1 (i64x2.splat (global.get $acc2)) (global.get $acc3)))
    (local.set $acc45 (i64x2.replace_lane 1 (i64x2.splat (global.get $acc4)) (global.get $acc5)))
    (local.set $acc67 (i64x2.replace_lane 1 (i64x2.splat (global.get $acc6)) (global.get $acc7)))

    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $count)))

        ;; The stripe loop: two stripes a turn, an even one and an odd one. Stripe s reads the secret from
        ;; byte 8*s: at turn p, the even stripe 2p reads it 16 bytes at a time from 16*p, where $s0..$s3
        ;; hold it, and the odd stripe 2p+1 from 8 bytes further, which straddles those windows (the high
        ;; half of $sN and the low half of $sN+1). At the end of the turn the windows move down one, so that
        ;; $sN always holds secret bytes 16*(p+N)..16*(p+N)+15.
        (local.set $s0 (global.get $secret0))
        (local.set $s1 (global.get $secret16))
        (local.set $s2 (global.get $secret32))
        (local.set $s3 (global.get $secret48))
        (local.set $s4 (global.get $secret64))
        (local.set $s5 (global.get $secret80))
        (local.set $s6 (global.get $secret96))
        (local.set $s7 (global.get $secret112))
        (local.set $s8 (global.get $secret128))
        (local.set $s9 (global.get $secret144))
        (local.set $s10 (global.get $secret160))
        (local.set $s11 (global.get $secret176))
        (local.set $stripe (local.get $ptr))
        (local.set $pairs (i32.const 8))
        (loop $stripes
          ;; XXH3_accumulate_512 of the even stripe, lane by lane. For lane 0:
          ;;   data = input words 0 and 1, key = data ^ secret words 0 and 1 of the stripe's secret;
          ;;   acc[1] += data word 0 and acc[0] += data word 1: data with its halves swapped;
          ;;   acc[0] += low half * high half of key word 0, acc[1] the same of key word 1:
          ;;   i64x2.extmul_low_i32x4_u multiplies the first two 32-bit lanes of two vectors into two 64-bit
          ;;   products, so it gets the low halves (32-bit lanes 0 and 2 of key) and the high ones (1 and 3).
          (local.set $data (v128.load offset=0 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data) (local.get $s0)))
          (local.set $acc01 (i64x2.add (local.get $acc01)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc01 (i64x2.add (local.get $acc01) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          ;; lane 1: input words 2 and 3, acc[2] and acc[3]
          (local.set $data (v128.load offset=16 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data) (local.get $s1)))
          (local.set $acc23 (i64x2.add (local.get $acc23)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc23 (i64x2.add (local.get $acc23) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          ;; lane 2: input words 4 and 5, acc[4] and acc[5]
          (local.set $data (v128.load offset=32 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data) (local.get $s2)))
          (local.set $acc45 (i64x2.add (local.get $acc45)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc45 (i64x2.add (local.get $acc45) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          ;; lane 3: input words 6 and 7, acc[6] and acc[7]
          (local.set $data (v128.load offset=48 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data) (local.get $s3)))
          (local.set $acc67 (i64x2.add (local.get $acc67)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc67 (i64x2.add (local.get $acc67) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))

          ;; XXH3_accumulate_512 of the odd stripe (64 bytes on), the same but for its secret: lane N reads
          ;; the 16 secret bytes 8 bytes into $sN, the high half of $sN then the low half of $sN+1.
          (local.set $data (v128.load offset=64 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 (local.get $s0) (local.get $s1))))
          (local.set $acc01 (i64x2.add (local.get $acc01)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc01 (i64x2.add (local.get $acc01) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          (local.set $data (v128.load offset=80 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 (local.get $s1) (local.get $s2))))
          (local.set $acc23 (i64x2.add (local.get $acc23)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc23 (i64x2.add (local.get $acc23) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          (local.set $data (v128.load offset=96 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 (local.get $s2) (local.get $s3))))
          (local.set $acc45 (i64x2.add (local.get $acc45)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc45 (i64x2.add (local.get $acc45) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))
          (local.set $data (v128.load offset=112 (local.get $stripe)))
          (local.set $key (v128.xor (local.get $data)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 (local.get $s3) (local.get $s4))))
          (local.set $acc67 (i64x2.add (local.get $acc67)
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $data) (local.get $data))))
          (local.set $acc67 (i64x2.add (local.get $acc67) (i64x2.extmul_low_i32x4_u
            (i8x16.shuffle 0 1 2 3 8 9 10 11 0 1 2 3 8 9 10 11 (local.get $key) (local.get $key))
            (i8x16.shuffle 4 5 6 7 12 13 14 15 4 5 6 7 12 13 14 15 (local.get $key) (local.get $key)))))

          ;; the next pair's secret: 16 bytes further
          (local.set $s0 (local.get $s1))
          (local.set $s1 (local.get $s2))
          (local.set $s2 (local.get $s3))
          (local.set $s3 (local.get $s4))
          (local.set $s4 (local.get $s5))
          (local.set $s5 (local.get $s6))
          (local.set $s6 (local.get $s7))
          (local.set $s7 (local.get $s8))
          (local.set $s8 (local.get $s9))
          (local.set $s9 (local.get $s10))
          (local.set $s10 (local.get $s11))
          (local.set $stripe (i32.add (local.get $stripe) (i32.const 128)))
          (br_if $stripes (local.tee $pairs (i32.sub (local.get $pairs) (i32.const 1)))))

        ;; XXH3_scrambleAcc with the last 64 bytes of the secret (bytes 128..191); PRIME32_1 = 0x9E3779B1
        (local.set $acc01 (i64x2.mul
          (v128.xor (v128.xor (local.get $acc01) (i64x2.shr_u (local.get $acc01) (i32.const 47))) (global.get $secret128))
          (v128.const i64x2 0x9E3779B1 0x9E3779B1)))
        (local.set $acc23 (i64x2.mul
          (v128.xor (v128.xor (local.get $acc23) (i64x2.shr_u (local.get $acc23) (i32.const 47))) (global.get $secret144))
          (v128.const i64x2 0x9E3779B1 0x9E3779B1)))
        (local.set $acc45 (i64x2.mul
          (v128.xor (v128.xor (local.get $acc45) (i64x2.shr_u (local.get $acc45) (i32.const 47))) (global.get $secret160))
          (v128.const i64x2 0x9E3779B1 0x9E3779B1)))
        (local.set $acc67 (i64x2.mul
          (v128.xor (v128.xor (local.get $acc67) (i64x2.shr_u (local.get $acc67) (i32.const 47))) (global.get $secret176))
          (v128.const i64x2 0x9E3779B1 0x9E3779B1)))

        ;; the next block
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1024)))
        (local.set $count (i32.sub (local.get $count) (i32.const 1)))
        (br $block)))

    ;; back to the caller
    (global.set $acc0 (i64x2.extract_lane 0 (local.get $acc01)))
    (global.set $acc1 (i64x2.extract_lane 1 (local.get $acc01)))
    (global.set $acc2 (i64x2.extract_lane 0 (local.get $acc23)))
    (global.set $acc3 (i64x2.extract_lane 1 (local.get $acc23)))
    (global.set $acc4 (i64x2.extract_lane 0 (local.get $acc45)))
    (global.set $acc5 (i64x2.extract_lane 1 (local.get $acc45)))
    (global.set $acc6 (i64x2.extract_lane 0 (local.get $acc67)))
    (global.set $acc7 (i64x2.extract_lane 1 (local.get $acc67))))
)
