//! A PNG encoder for the chart's RGB bitmap: small enough to keep the
//! packaged binary under its size limit (plotters' own encoder brings the
//! `image` crate, about 250 KiB). Each row takes the filter (none, sub or
//! up) that leaves it smallest; the deflate stream is one block of fixed
//! Huffman codes holding literals and runs (matches at distance 1), which
//! is what a chart's flat background and lines compress to.

/// `rgb` (8-bit RGB, rows top to bottom) as a PNG file.
pub fn encode(rgb: &[u8], (width, height): (u32, u32)) -> Vec<u8> {
    let stride = width as usize * 3;
    let mut filtered = Vec::with_capacity(rgb.len() + height as usize);
    let zero = vec![0u8; stride];
    for (y, row) in rgb.chunks_exact(stride).enumerate() {
        let up = if y == 0 {
            &zero[..]
        } else {
            &rgb[(y - 1) * stride..y * stride]
        };
        let none = row.to_vec();
        let sub: Vec<u8> = (0..stride)
            .map(|i| row[i].wrapping_sub(if i >= 3 { row[i - 3] } else { 0 }))
            .collect();
        let up: Vec<u8> = (0..stride).map(|i| row[i].wrapping_sub(up[i])).collect();
        let cost =
            |f: &[u8]| -> u64 { f.iter().map(|&b| u64::from((b as i8).unsigned_abs())).sum() };
        let (kind, bytes) = [(0u8, none), (1, sub), (2, up)]
            .into_iter()
            .min_by_key(|(_, f)| cost(f))
            .expect("three filters");
        filtered.push(kind);
        filtered.extend(bytes);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    // 8 bits per sample, RGB, deflate, adaptive filtering, no interlace.
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib(&filtered));
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zlib stream: header, one fixed-Huffman deflate block, Adler-32.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut bits = Bits::default();
    // CMF (deflate, 32 KiB window) and FLG (a multiple of 31 with it).
    bits.put(0x78, 8);
    bits.put(0x01, 8);
    bits.put(1, 1); // the final block
    bits.put(1, 2); // fixed Huffman codes
    let mut i = 0;
    while i < data.len() {
        let mut run = 0;
        if i > 0 {
            while run < 258 && i + run < data.len() && data[i + run] == data[i - 1] {
                run += 1;
            }
        }
        if run >= 3 {
            length(&mut bits, run);
            bits.code(0, 5); // distance 1
            i += run;
        } else {
            literal(&mut bits, u16::from(data[i]));
            i += 1;
        }
    }
    literal(&mut bits, 256);
    let mut out = bits.finish();
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

/// A literal (0..=255), the end of block (256) or a length code
/// (257..=285), in the fixed Huffman code of RFC 1951, 3.2.6.
fn literal(bits: &mut Bits, v: u16) {
    let v = u32::from(v);
    match v {
        0..=143 => bits.code(0x30 + v, 8),
        144..=255 => bits.code(0x190 + v - 144, 9),
        256..=279 => bits.code(v - 256, 7),
        _ => bits.code(0xc0 + v - 280, 8),
    }
}

/// A match length (3..=258): its code, then its extra bits.
fn length(bits: &mut Bits, len: usize) {
    const BASE: [usize; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let i = BASE
        .iter()
        .rposition(|&b| b <= len)
        .expect("a length of 3 or more");
    literal(bits, 257 + i as u16);
    bits.put((len - BASE[i]) as u64, EXTRA[i]);
}

/// Deflate's bit order: values least significant bit first, Huffman
/// codes most significant bit first.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, count: u32) {
        self.acc |= value << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn code(&mut self, code: u32, count: u32) {
        let reversed = code.reverse_bits() >> (32 - count);
        self.put(u64::from(reversed), count);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_png_decodes_to_the_pixels_it_was_given() {
        let (w, h) = (37u32, 23u32);
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        let mut seed = 7u32;
        for (i, px) in rgb.iter_mut().enumerate() {
            // Flat areas, lines and noise: every filter and code path.
            if i % 97 < 20 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *px = (seed >> 16) as u8;
            } else if i % 11 == 0 {
                *px = 31;
            }
        }
        let file = super::encode(&rgb, (w, h));
        let image = image::load_from_memory_with_format(&file, image::ImageFormat::Png)
            .expect("a valid PNG")
            .to_rgb8();
        assert_eq!(image.dimensions(), (w, h));
        assert_eq!(image.into_raw(), rgb);
        // A flat picture compresses to almost nothing.
        let white = vec![255u8; 1000 * 500 * 3];
        assert!(super::encode(&white, (1000, 500)).len() < 20_000);
    }
}
