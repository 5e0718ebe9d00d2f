//! Page-locked host memory for staged adapters (the host tier).
//!
//! Pinning fresh memory holds the CUDA driver's lock for tens of milliseconds, and the engine's
//! kernel launches wait for it meanwhile: a cold adapter's load made the decoders' tokens wait
//! 40-100 ms on the H200. So the host tier's budget is pinned once, at startup, as one region
//! that staged adapters take ranges of ([`PinnedPool::take`]); a range comes back when its
//! adapter drops, and is handed out again once the last copy from it completed. Only a load
//! that finds no room in the region pins a buffer of its own (kept for reuse afterwards, up to
//! a byte budget).

use std::sync::Mutex;

use cudarc::driver::{CudaEvent, PinnedHostSlice};

use crate::engine::backend::{BackendError, Result};

use super::{dev_err, lock};

/// Ranges of the region start at multiples of this (the SGMV kernels read staged rows in
/// 16-byte vectors; 256 keeps every range on its own cache lines).
pub const RANGE_ALIGN: usize = 256;

/// First-fit allocation of byte ranges in a region of `len` bytes; a freed range merges with
/// free neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    /// Free `(offset, len)` runs, sorted, disjoint and never adjacent.
    free: Vec<(usize, usize)>,
}

impl Ranges {
    /// A region of `len` bytes, all free.
    pub fn new(len: usize) -> Self {
        let len = len - len % RANGE_ALIGN;
        Ranges {
            free: if len > 0 { vec![(0, len)] } else { Vec::new() },
        }
    }

    /// The size a request of `len` bytes takes (what [`Self::free`] gets back).
    pub fn size_of(len: usize) -> usize {
        len.max(1).next_multiple_of(RANGE_ALIGN)
    }

    /// The offset of a free range of [`Self::size_of`]`(len)` bytes, the lowest that fits.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        let size = Self::size_of(len);
        let i = self.free.iter().position(|&(_, l)| l >= size)?;
        let (off, l) = self.free[i];
        if l == size {
            self.free.remove(i);
        } else {
            self.free[i] = (off + size, l - size);
        }
        Some(off)
    }

    /// Give back the range at `off` that [`Self::alloc`]`(len)` returned.
    pub fn free(&mut self, off: usize, len: usize) {
        let size = Self::size_of(len);
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, size));
        if i + 1 < self.free.len() && off + size == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == off {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Free bytes in all.
    pub fn free_bytes(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

/// The region pinned at startup.
struct Region {
    mem: PinnedHostSlice<u8>,
    /// Its first byte's address.
    base: usize,
    ranges: Ranges,
    /// Ranges given back while a copy from them may still run, with the copy's event.
    pending: Vec<(usize, usize, CudaEvent)>,
}

impl Region {
    /// Free the pending ranges whose copy completed (all of them with `wait`).
    fn reclaim(&mut self, wait: bool) -> Result<()> {
        let mut i = 0;
        while i < self.pending.len() {
            let done = if wait {
                self.pending[i]
                    .2
                    .synchronize()
                    .map_err(|e| dev_err("wait for a staging copy", e))?;
                true
            } else {
                self.pending[i].2.is_complete()
            };
            if done {
                let (off, len, _) = self.pending.swap_remove(i);
                self.ranges.free(off, len);
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

/// Where a staged adapter's bytes are.
pub enum HostMem {
    /// `len` bytes at `off` in the pool's region (whose first byte is at `base`).
    Range { base: usize, off: usize, len: usize },
    /// A buffer of its own.
    Own(PinnedHostSlice<u8>),
}

impl HostMem {
    /// Its bytes, to fill.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        match self {
            // SAFETY: the pool hands a range to one staged adapter at a time, and the region
            // outlives it (the pool is kept by every staged adapter); `len` bytes at `off` are
            // inside the region.
            HostMem::Range { base, off, len } => {
                Ok(unsafe { std::slice::from_raw_parts_mut((*base + *off) as *mut u8, *len) })
            }
            HostMem::Own(buf) => buf
                .as_mut_slice()
                .map_err(|e| dev_err("page-locked host memory", e)),
        }
    }

    /// Its bytes, to copy from.
    pub fn bytes(&self) -> Result<&[u8]> {
        match self {
            // SAFETY: as in `bytes_mut`.
            HostMem::Range { base, off, len } => {
                Ok(unsafe { std::slice::from_raw_parts((*base + *off) as *const u8, *len) })
            }
            HostMem::Own(buf) => buf
                .as_slice()
                .map_err(|e| dev_err("page-locked host memory", e)),
        }
    }
}

/// The backend's page-locked memory for staged adapters: the region, and buffers pinned when
/// it had no room (kept for reuse up to `keep_bytes`).
pub struct PinnedPool {
    region: Mutex<Option<Region>>,
    /// Free buffers of their own, each with the event of the last copy that read it.
    free: Mutex<Vec<(PinnedHostSlice<u8>, Option<CudaEvent>)>>,
    /// Most bytes of free buffers kept.
    keep_bytes: usize,
}

impl PinnedPool {
    pub fn new() -> Self {
        PinnedPool {
            region: Mutex::new(None),
            free: Mutex::new(Vec::new()),
            keep_bytes: 1 << 30,
        }
    }

    /// Make `mem` the region. One before it is replaced only once every range of it is back
    /// and its copies completed (an error otherwise: staged adapters still use it).
    pub fn set_region(&self, mut mem: PinnedHostSlice<u8>) -> Result<()> {
        let bytes = mem
            .as_mut_slice()
            .map_err(|e| dev_err("page-locked host memory", e))?;
        let base = bytes.as_mut_ptr() as usize;
        let ranges = Ranges::new(bytes.len());
        let mut region = lock(&self.region);
        if let Some(old) = region.as_mut() {
            old.reclaim(true)?;
            if old.ranges != Ranges::new(old.mem.len()) {
                return Err(BackendError::Device(
                    "staged adapters still hold ranges of the page-locked region".into(),
                ));
            }
        }
        *region = Some(Region {
            mem,
            base,
            ranges,
            pending: Vec::new(),
        });
        Ok(())
    }

    /// Memory for `bytes` bytes that needs no pinning: a range of the region, else the
    /// smallest free buffer that holds it without wasting more than three quarters, once the
    /// last copy from it completed. `None`: the caller pins a buffer.
    pub fn take(&self, bytes: usize) -> Result<Option<HostMem>> {
        if let Some(region) = lock(&self.region).as_mut() {
            region.reclaim(false)?;
            let mut off = region.ranges.alloc(bytes);
            if off.is_none() && !region.pending.is_empty() {
                region.reclaim(true)?;
                off = region.ranges.alloc(bytes);
            }
            if let Some(off) = off {
                return Ok(Some(HostMem::Range {
                    base: region.base,
                    off,
                    len: bytes,
                }));
            }
            tracing::debug!(
                wanted_mib = bytes >> 20,
                free_mib = region.ranges.free_bytes() >> 20,
                "no room for a staged adapter in the page-locked region"
            );
        }
        let (buf, copied) = {
            let mut free = lock(&self.free);
            let Some(best) = free
                .iter()
                .enumerate()
                .filter(|(_, (b, _))| b.len() >= bytes && b.len() / 4 <= bytes)
                .min_by_key(|(_, (b, _))| b.len())
                .map(|(i, _)| i)
            else {
                return Ok(None);
            };
            free.swap_remove(best)
        };
        if let Some(event) = copied {
            event
                .synchronize()
                .map_err(|e| dev_err("wait for a staging copy", e))?;
        }
        Ok(Some(HostMem::Own(buf)))
    }

    /// Take back what [`Self::take`] gave (or a buffer pinned for a load), with the event of
    /// the last copy from it.
    pub fn put(&self, mem: HostMem, copied: Option<CudaEvent>) {
        match mem {
            HostMem::Range { base, off, len } => {
                let mut region = lock(&self.region);
                // The region is never replaced while it has ranges out (`set_region`).
                if let Some(region) = region.as_mut().filter(|r| r.base == base) {
                    match copied {
                        Some(event) if !event.is_complete() => {
                            region.pending.push((off, len, event))
                        }
                        _ => region.ranges.free(off, len),
                    }
                }
            }
            HostMem::Own(buf) => {
                let mut free = lock(&self.free);
                let held: usize = free.iter().map(|(b, _)| b.len()).sum();
                if held + buf.len() <= self.keep_bytes {
                    free.push((buf, copied));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_first_fit_aligned_and_merge_when_freed() {
        let mut r = Ranges::new(10 * RANGE_ALIGN + 100);
        assert_eq!(r.free_bytes(), 10 * RANGE_ALIGN);
        let a = r.alloc(3 * RANGE_ALIGN).unwrap();
        let b = r.alloc(1).unwrap();
        let c = r.alloc(2 * RANGE_ALIGN + 1).unwrap();
        assert_eq!((a, b, c), (0, 3 * RANGE_ALIGN, 4 * RANGE_ALIGN));
        assert_eq!(r.free_bytes(), 3 * RANGE_ALIGN);
        assert_eq!(r.alloc(4 * RANGE_ALIGN), None);
        // A hole in the middle is reused first, for what fits in it.
        r.free(b, 1);
        assert_eq!(r.alloc(RANGE_ALIGN), Some(b));
        r.free(b, 1);
        // Freeing a, then c, merges a|b and then the whole region back into one run.
        r.free(a, 3 * RANGE_ALIGN);
        assert_eq!(r.alloc(4 * RANGE_ALIGN), Some(0));
        r.free(0, 4 * RANGE_ALIGN);
        r.free(c, 2 * RANGE_ALIGN + 1);
        assert_eq!(r, Ranges::new(10 * RANGE_ALIGN));
        assert_eq!(r.alloc(10 * RANGE_ALIGN), Some(0));
        assert_eq!(r.alloc(1), None);
    }

    #[test]
    fn an_empty_region_has_no_range() {
        let mut r = Ranges::new(RANGE_ALIGN - 1);
        assert_eq!(r.free_bytes(), 0);
        assert_eq!(r.alloc(1), None);
    }
}
