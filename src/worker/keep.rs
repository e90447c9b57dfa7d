//! The shaping decisions one batch's samples use, held until the batch has reached the
//! shards: a sample borrows its shaped name from here, and a sample sent back by a shard
//! finds its decision again by index.

use std::cell::RefCell;
use std::sync::Arc;

use crate::shaping::Shaped;

/// An append-only list of decisions, borrowed for a batch: what it lists stays in place
/// until the worker clears it between batches. Lending one the worker keeps anyway (beside
/// its context cache) touches nothing of it; holding one keeps it alive here.
#[derive(Default)]
pub(super) struct Keep {
    /// The address of each decision listed, by index.
    listed: RefCell<Vec<usize>>,
    /// The decisions only this list keeps alive.
    owned: RefCell<Vec<Arc<Shaped>>>,
}

impl Keep {
    /// Lists `shaped`, keeping it alive for the batch. Returns its index (from 1; 0 in a
    /// sample means none) and a borrow that lasts as long as the batch's.
    pub(super) fn hold(&self, shaped: Arc<Shaped>) -> (u32, &Shaped) {
        let at = Arc::as_ptr(&shaped);
        self.owned.borrow_mut().push(shaped);
        // SAFETY: `owned` keeps the `Arc` just pushed, and with it the decision, alive and
        // unmoved until `clear(&mut self)`, which cannot run while `self` is borrowed.
        unsafe { self.lend(at) }
    }

    /// Lists the decision at `shaped` without touching it.
    ///
    /// # Safety
    ///
    /// `shaped` must point to a decision that stays alive and unmoved until this list is
    /// cleared (an `Arc` the worker keeps and does not drop before the batch ends).
    pub(super) unsafe fn lend(&self, shaped: *const Shaped) -> (u32, &Shaped) {
        let mut listed = self.listed.borrow_mut();
        listed.push(shaped as usize);
        // SAFETY: the caller guarantees the decision outlives the list's current contents,
        // and so any borrow of `self`.
        (listed.len() as u32, unsafe { &*shaped })
    }

    /// The decision listed at `index` (as [`Keep::hold`] or [`Keep::lend`] returned it).
    pub(super) fn get(&self, index: u32) -> &Shaped {
        let at = self.listed.borrow()[index as usize - 1] as *const Shaped;
        // SAFETY: every address listed is of a decision alive until the list is cleared
        // (`hold` keeps it; `lend`'s caller promised it), and `self` is borrowed.
        unsafe { &*at }
    }

    /// Lets go of every decision; the allocations stay for the next batch.
    pub(super) fn clear(&mut self) {
        self.listed.get_mut().clear();
        self.owned.get_mut().clear();
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
                host: None,
            })
        };
        let first = keep.hold(shaped(0));
        let lent = shaped(100);
        // SAFETY: `lent` lives until the end of the test, after the list's last use.
        let (at, borrowed) = unsafe { keep.lend(Arc::as_ptr(&lent)) };
        assert_eq!((at, &*borrowed.name), (2, "m100"));
        let rest: Vec<_> = (1..100).map(|n| keep.hold(shaped(n))).collect();
        assert_eq!((first.0, &*first.1.name), (1, "m0"));
        assert_eq!((rest[98].0, &*rest[98].1.name), (101, "m99"));
        assert_eq!(&*keep.get(51).name, "m49");
        assert_eq!(&*keep.get(2).name, "m100");
        let mut keep = keep;
        keep.clear();
        assert_eq!(keep.hold(shaped(7)).0, 1);
    }
}
