//! The shaping decisions one batch's samples use, held until the batch has reached the
//! shards: a sample borrows its shaped name from here, and a sample sent back by a shard
//! finds its decision again by index.

use std::cell::RefCell;
use std::sync::Arc;

use crate::shaping::Shaped;

/// An append-only list of decisions, borrowed for a batch: what it holds stays in place
/// until the worker clears it between batches.
#[derive(Default)]
pub(super) struct Keep {
    held: RefCell<Vec<Arc<Shaped>>>,
}

impl Keep {
    /// Holds `shaped` for the batch. Returns its index (from 1; 0 in a sample means none)
    /// and a borrow that lasts as long as the batch's.
    pub(super) fn hold(&self, shaped: Arc<Shaped>) -> (u32, &Shaped) {
        let at: *const Shaped = Arc::as_ptr(&shaped);
        let mut held = self.held.borrow_mut();
        held.push(shaped);
        let index = held.len() as u32;
        // SAFETY: the `Arc` just pushed keeps its `Shaped` alive at the same address until it
        // leaves `held`, which happens only through `clear(&mut self)` or by dropping `self`;
        // neither can happen while the returned borrow of `self` lives. Moving the `Arc`s
        // when the vector grows does not move what they point to.
        (index, unsafe { &*at })
    }

    /// The decision held at `index` (as [`Keep::hold`] returned it).
    pub(super) fn get(&self, index: u32) -> &Shaped {
        let at: *const Shaped = Arc::as_ptr(&self.held.borrow()[index as usize - 1]);
        // SAFETY: as in `hold`: the entry stays, unmoved, while `self` is borrowed.
        unsafe { &*at }
    }

    /// Lets go of every decision; the allocation stays for the next batch.
    pub(super) fn clear(&mut self) {
        self.held.get_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_held_stays_in_place_as_the_list_grows() {
        let keep = Keep::default();
        let shaped = |n: usize| {
            Arc::new(Shaped {
                name: format!("m{n}").into(),
                tags: Box::new([]),
                blocked: false,
                filter: None,
                copy: None,
            })
        };
        let first = keep.hold(shaped(0));
        let rest: Vec<_> = (1..100).map(|n| keep.hold(shaped(n))).collect();
        assert_eq!((first.0, &*first.1.name), (1, "m0"));
        assert_eq!((rest[98].0, &*rest[98].1.name), (100, "m99"));
        assert_eq!(&*keep.get(50).name, "m49");
        let mut keep = keep;
        keep.clear();
        assert_eq!(keep.hold(shaped(7)).0, 1);
    }
}
