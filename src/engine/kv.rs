//! The paged KV-cache block allocator: which physical blocks of the device KV pool belong to
//! which sequence. Pure bookkeeping (no tensors); the backend owns the pool itself, laid out as
//! `[num_blocks, BLOCK_SIZE, n_kv_heads, head_dim]` per layer, and reads positions through the
//! block tables built here.

use crate::engine::backend::BLOCK_SIZE;

/// Errors of the allocator. Running out of blocks is expected under load (the scheduler
/// preempts); the rest are caller bugs reported as values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("KV pool exhausted: {needed} blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("position {pos} is beyond the {tokens} reserved tokens of this sequence")]
    PositionOutOfRange { pos: usize, tokens: usize },
}

/// Number of blocks that hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// One sequence's block table: the physical blocks of its KV, in token order, and how many
/// token slots of them are reserved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    tokens: usize,
}

impl BlockTable {
    /// An empty table (no blocks).
    pub fn new() -> Self {
        Self::default()
    }

    /// The physical block ids, in token order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Token slots reserved so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// True when the table holds no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The KV slot of the token at absolute position `pos`: `block_id * BLOCK_SIZE + offset`.
    pub fn slot(&self, pos: usize) -> Result<u32, KvError> {
        if pos >= self.tokens {
            return Err(KvError::PositionOutOfRange {
                pos,
                tokens: self.tokens,
            });
        }
        let block = self.blocks[pos / BLOCK_SIZE];
        Ok(block * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32)
    }

    /// Blocks that must be added to reserve `more` further tokens.
    pub fn blocks_needed(&self, more: usize) -> usize {
        blocks_for(self.tokens + more).saturating_sub(self.blocks.len())
    }
}

/// The free list of a KV pool of `total` blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free block ids; popped from the back, so recently freed blocks are reused first.
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        // Reverse order so that the first allocations get block 0, 1, 2, ... (easier to read).
        let free = (0..total as u32).rev().collect();
        Self { free, total }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not owned by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks owned by sequences.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Whether `table` can grow by `more` tokens without running out of blocks.
    pub fn can_reserve(&self, table: &BlockTable, more: usize) -> bool {
        table.blocks_needed(more) <= self.free.len()
    }

    /// Reserve slots for `more` further tokens of `table`, taking new blocks as needed.
    /// All or nothing: on error the table is unchanged.
    pub fn reserve(&mut self, table: &mut BlockTable, more: usize) -> Result<(), KvError> {
        let needed = table.blocks_needed(more);
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - needed;
        table.blocks.extend(self.free.drain(at..).rev());
        table.tokens += more;
        Ok(())
    }

    /// Return all of `table`'s blocks to the pool and empty it. Freeing an empty table is a no-op,
    /// so a sequence can be released twice (finish racing a cancel) without corrupting the pool.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
        table.tokens = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_takes_one_block_per_sixteen_tokens() {
        let mut pool = BlockAllocator::new(8);
        let mut t = BlockTable::new();
        pool.reserve(&mut t, 1).unwrap();
        assert_eq!(t.blocks().len(), 1);
        pool.reserve(&mut t, 15).unwrap();
        assert_eq!(t.blocks().len(), 1, "16 tokens fit one block");
        pool.reserve(&mut t, 1).unwrap();
        assert_eq!(t.blocks().len(), 2);
        assert_eq!(t.tokens(), 17);
        assert_eq!(pool.used(), 2);
        assert_eq!(pool.free(), 6);
    }

    #[test]
    fn slots_map_positions_through_the_block_table() {
        let mut pool = BlockAllocator::new(8);
        let mut other = BlockTable::new();
        pool.reserve(&mut other, 16).unwrap(); // takes block 0
        let mut t = BlockTable::new();
        pool.reserve(&mut t, 20).unwrap(); // blocks 1, 2
        assert_eq!(t.blocks(), &[1, 2]);
        assert_eq!(t.slot(0).unwrap(), 16);
        assert_eq!(t.slot(15).unwrap(), 31);
        assert_eq!(t.slot(16).unwrap(), 32);
        assert_eq!(t.slot(19).unwrap(), 35);
        assert_eq!(
            t.slot(20),
            Err(KvError::PositionOutOfRange {
                pos: 20,
                tokens: 20
            })
        );
    }

    #[test]
    fn running_out_of_blocks_is_an_error_that_changes_nothing() {
        let mut pool = BlockAllocator::new(2);
        let mut t = BlockTable::new();
        pool.reserve(&mut t, 10).unwrap();
        let before = t.clone();
        assert_eq!(
            pool.reserve(&mut t, 40),
            Err(KvError::OutOfBlocks { needed: 3, free: 1 })
        );
        assert_eq!(t, before);
        assert_eq!(pool.free(), 1);
        assert!(pool.can_reserve(&t, 22));
        assert!(!pool.can_reserve(&t, 23));
    }

    #[test]
    fn released_blocks_return_to_the_pool_and_are_reused() {
        let mut pool = BlockAllocator::new(4);
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        pool.reserve(&mut a, 33).unwrap();
        pool.reserve(&mut b, 16).unwrap();
        assert_eq!(pool.free(), 0);
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(a.tokens(), 0);
        assert_eq!(pool.free(), 3);
        pool.release(&mut a);
        assert_eq!(
            pool.free(),
            3,
            "a second release of the same table is a no-op"
        );
        let mut c = BlockTable::new();
        pool.reserve(&mut c, 48).unwrap();
        let mut all: Vec<u32> = c.blocks().iter().chain(b.blocks()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3], "no block is handed out twice");
    }
}
