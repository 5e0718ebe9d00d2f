//! Batch rows -> SGMV segment table. Pure and unit-tested: the scheduler orders rows so that
//! rows sharing an adapter slot are contiguous, and this turns the per-row slots into segments.

/// Contiguous row ranges that share one adapter slot. Rows with no adapter belong to no segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentTable {
    /// First row of each segment.
    pub starts: Vec<u32>,
    /// One past the last row of each segment.
    pub ends: Vec<u32>,
    /// Adapter slot of each segment (index into the per-layer LoRA tables).
    pub slots: Vec<u32>,
}

impl SegmentTable {
    /// Group runs of equal slots. `row_slots[i]` is row i's adapter slot, `None` for the base model.
    /// Equal slots that are not adjacent become separate segments (still correct, one more launch
    /// block), so callers should sort rows by slot first.
    pub fn from_row_slots(row_slots: &[Option<u32>]) -> Self {
        let mut table = SegmentTable::default();
        let mut i = 0;
        while i < row_slots.len() {
            let Some(slot) = row_slots[i] else {
                i += 1;
                continue;
            };
            let start = i;
            while i < row_slots.len() && row_slots[i] == Some(slot) {
                i += 1;
            }
            table.starts.push(start as u32);
            table.ends.push(i as u32);
            table.slots.push(slot);
        }
        table
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Iterate `(start, end, slot)`.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
        self.starts
            .iter()
            .zip(&self.ends)
            .zip(&self.slots)
            .map(|((&s, &e), &slot)| (s as usize, e as usize, slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_equal_slots_become_segments_and_base_rows_are_skipped() {
        let t = SegmentTable::from_row_slots(&[
            Some(3),
            Some(3),
            None,
            Some(1),
            Some(1),
            Some(1),
            None,
        ]);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(0, 2, 3), (3, 6, 1)]);
    }

    #[test]
    fn an_all_base_batch_has_no_segments() {
        assert!(SegmentTable::from_row_slots(&[None, None]).is_empty());
        assert!(SegmentTable::from_row_slots(&[]).is_empty());
    }
}
