//! A sorted index with positional access: the roster's order by name and
//! by delay, so that a view's window (rows `offset..offset + limit`) costs
//! O(room / BLOCK + limit), not O(room).
//!
//! The keys live in sorted blocks of at most `2 * BLOCK`; an insert or a
//! removal shifts one block (a few hundred keys), a position is found by
//! walking the blocks' lengths.

/// Keys per block after a split.
const BLOCK: usize = 256;

/// A sorted set of keys with access by position.
#[derive(Debug, Clone)]
pub struct SortedIndex<K> {
    blocks: Vec<Vec<K>>,
    len: usize,
}

impl<K: Ord> Default for SortedIndex<K> {
    fn default() -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord> SortedIndex<K> {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block that holds `key` or would: the first whose last key is
    /// not below it, else the last block.
    fn block_of(&self, key: &K) -> usize {
        let i = self
            .blocks
            .partition_point(|b| b.last().is_some_and(|last| last < key));
        i.min(self.blocks.len().saturating_sub(1))
    }

    /// Inserts `key`; false if it was there already.
    pub fn insert(&mut self, key: K) -> bool {
        if self.blocks.is_empty() {
            self.blocks.push(vec![key]);
            self.len = 1;
            return true;
        }
        let b = self.block_of(&key);
        let block = &mut self.blocks[b];
        match block.binary_search(&key) {
            Ok(_) => return false,
            Err(at) => block.insert(at, key),
        }
        self.len += 1;
        if block.len() > 2 * BLOCK {
            let tail = block.split_off(BLOCK);
            self.blocks.insert(b + 1, tail);
        }
        true
    }

    /// Removes `key`; false if it was not there.
    pub fn remove(&mut self, key: &K) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let b = self.block_of(key);
        let block = &mut self.blocks[b];
        let Ok(at) = block.binary_search(key) else {
            return false;
        };
        block.remove(at);
        self.len -= 1;
        if block.is_empty() {
            self.blocks.remove(b);
        }
        true
    }

    /// Number of keys below `key`.
    pub fn rank(&self, key: &K) -> usize {
        let b = self
            .blocks
            .partition_point(|blk| blk.last().is_some_and(|last| last < key));
        let before: usize = self.blocks[..b].iter().map(Vec::len).sum();
        before
            + self
                .blocks
                .get(b)
                .map_or(0, |blk| blk.partition_point(|k| k < key))
    }

    /// The keys from position `pos` on, ascending.
    pub fn iter_from(&self, pos: usize) -> impl Iterator<Item = &K> {
        let (b, i) = self.locate(pos);
        self.blocks
            .get(b)
            .into_iter()
            .flat_map(move |blk| blk[i..].iter())
            .chain(self.blocks.iter().skip(b + 1).flatten())
    }

    /// The keys from position `pos` counted from the end on, descending
    /// (`pos` 0 is the largest key).
    pub fn iter_back_from(&self, pos: usize) -> impl Iterator<Item = &K> {
        let end = self.len.saturating_sub(pos);
        let (b, i) = self.locate(end);
        // Keys before position `end`: the first `i` of block `b`, and
        // every block before it.
        let head = self.blocks.get(b).map_or(&[][..], |blk| &blk[..i]);
        head.iter().rev().chain(
            self.blocks[..b.min(self.blocks.len())]
                .iter()
                .rev()
                .flat_map(|blk| blk.iter().rev()),
        )
    }

    /// Every key, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.blocks.iter().flatten()
    }

    /// The block and the index in it of position `pos` (past the end:
    /// `(blocks.len(), 0)`).
    fn locate(&self, mut pos: usize) -> (usize, usize) {
        for (b, blk) in self.blocks.iter().enumerate() {
            if pos < blk.len() {
                return (b, pos);
            }
            pos -= blk.len();
        }
        (self.blocks.len(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_answers_by_position() {
        let mut idx = SortedIndex::default();
        // A scrambled insert order across many blocks.
        let n = 5 * 2 * BLOCK + 17;
        for i in 0..n {
            assert!(idx.insert((i * 7919) % n));
        }
        assert!(!idx.insert(3), "no duplicates");
        assert_eq!(idx.len(), n);
        assert!(idx.iter().copied().eq(0..n));
        assert!(idx.iter_from(600).copied().eq(600..n));
        assert!(idx.iter_from(n).next().is_none());
        assert!(idx.iter_back_from(0).copied().eq((0..n).rev()));
        assert!(idx.iter_back_from(10).copied().eq((0..n - 10).rev()));
        assert!(idx.iter_back_from(n).next().is_none());
        assert!(idx.iter_back_from(n + 5).next().is_none());
        assert_eq!(idx.rank(&0), 0);
        assert_eq!(idx.rank(&1000), 1000);
        for i in (0..n).filter(|i| i % 3 == 0) {
            assert!(idx.remove(&i));
        }
        assert!(!idx.remove(&0));
        let left: Vec<usize> = (0..n).filter(|i| i % 3 != 0).collect();
        assert_eq!(idx.len(), left.len());
        assert!(idx.iter().copied().eq(left.iter().copied()));
        assert!(idx.iter_from(100).copied().eq(left[100..].iter().copied()));
        assert_eq!(idx.rank(&left[500]), 500);
        for i in left {
            assert!(idx.remove(&i));
        }
        assert!(idx.is_empty());
        assert!(idx.iter_from(0).next().is_none());
    }
}
