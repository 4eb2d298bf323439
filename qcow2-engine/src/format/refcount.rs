//! Refcount entries of any width qemu-img makes (1 to 64 bits), packed as QEMU packs them:
//! widths below a byte fill each byte from the least significant bit, wider ones are big-endian.

/// Reads entry `index` of a refcount block of `1 << order`-bit entries.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block[index / per_byte];
        let shift = (index % per_byte) * bits;
        u64::from(byte >> shift) & ((1u64 << bits) - 1)
    } else {
        let n = bits / 8;
        let start = index * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes entry `index`; `value` must fit the width. Returns the byte range that changed.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) -> std::ops::Range<usize> {
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let at = index / per_byte;
        let shift = (index % per_byte) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
        at..at + 1
    } else {
        let n = bits / 8;
        let start = index * n;
        let bytes = value.to_be_bytes();
        block[start..start + n].copy_from_slice(&bytes[8 - n..]);
        start..start + n
    }
}

/// The largest refcount a width of `1 << order` bits holds.
pub fn max_value(order: u32) -> u64 {
    match 1u32 << order {
        64 => u64::MAX,
        bits => (1u64 << bits) - 1,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_values_follow_the_width() {
        assert_eq!(super::max_value(0), 1);
        assert_eq!(super::max_value(4), 65_535);
        assert_eq!(super::max_value(5), u64::from(u32::MAX));
        assert_eq!(super::max_value(6), u64::MAX);
    }

    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 64];
            let entries = 64 * 8 / bits as usize;
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
        }
    }

    #[test]
    fn one_bit_entries_are_lsb_first_like_qemu() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1);
        set(&mut block, 0, 3, 1);
        assert_eq!(block[0], 0b1001);
        let mut block = vec![0u8; 2];
        set(&mut block, 4, 0, 0x0102);
        assert_eq!(block, vec![1, 2]);
    }
}
