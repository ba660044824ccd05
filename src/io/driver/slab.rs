//! A worker's connections: a slab of slots, each with a generation.
//!
//! A connection is a value in a slot, not a task: no future, no waker, no allocation of its own
//! beyond what its state needs. A freed slot is reused for the next connection with its
//! generation bumped, so that a late completion carrying the old generation finds nothing.
//! Must never: hand out a slot that is occupied, or find a value under a stale generation.

/// One slot: its generation and, while occupied, its value.
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values addressed by `(slot, generation)`.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Free slot numbers, most recently freed last (reused first: its memory is warm).
    free: Vec<u32>,
    len: usize,
    /// The generation a slot created past the end starts at: above every generation a slot given
    /// up by [`Slab::shrink`] ever had, so that no token of a dropped slot names a new one.
    fresh_generation: u32,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0, fresh_generation: 0 }
    }
}

impl<T> Slab<T> {
    /// Stores `value` in a free slot; returns its slot and generation.
    pub fn insert(&mut self, value: T) -> (u32, u32) {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            debug_assert!(slot.value.is_none());
            slot.value = Some(value);
            return (index, slot.generation);
        }
        let index = self.slots.len() as u32;
        let generation = self.fresh_generation;
        self.slots.push(Slot { generation, value: Some(value) });
        (index, generation)
    }

    /// The value in `slot` if it is still the one of `generation`.
    pub fn get_mut(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        match self.slots.get_mut(slot as usize) {
            Some(Slot { generation: g, value: Some(value) }) if *g == generation => Some(value),
            _ => None,
        }
    }

    /// Takes the value out and frees the slot for reuse under the next generation.
    pub fn remove(&mut self, slot: u32, generation: u32) -> Option<T> {
        let entry = self.slots.get_mut(slot as usize)?;
        if entry.generation != generation {
            return None;
        }
        let value = entry.value.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(slot);
        self.len -= 1;
        Some(value)
    }

    /// Occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is occupied.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The occupied slots' numbers and generations (a snapshot, so the slab may change meanwhile).
    pub fn keys(&self) -> Vec<(u32, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| (i as u32, s.generation))
            .collect()
    }

    /// Whether a burst has come and gone: many slots exist and at most a quarter are occupied,
    /// with free slots at the end to give back (checked cheaply on every loop turn).
    pub fn is_mostly_free(&self) -> bool {
        self.slots.len() >= 256
            && self.len * 4 <= self.slots.len()
            && self.slots.last().is_some_and(|s| s.value.is_none())
    }

    /// Gives back the memory of a burst once most slots are free again: trailing free slots are
    /// dropped and the vectors shrink, so that RSS returns after many connections close.
    /// Returns how many slots it gave up.
    pub fn shrink(&mut self) -> usize {
        let before = self.slots.len();
        while self.slots.last().is_some_and(|s| s.value.is_none()) {
            if let Some(slot) = self.slots.pop() {
                self.fresh_generation = self.fresh_generation.max(slot.generation.wrapping_add(1));
            }
        }
        let len = self.slots.len() as u32;
        self.free.retain(|&i| i < len);
        if self.slots.capacity() > 2 * self.slots.len() + 64 {
            self.slots.shrink_to_fit();
            self.free.shrink_to_fit();
        }
        before - self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn a_reused_slot_does_not_answer_to_its_old_generation() {
        let mut slab = Slab::default();
        let (slot, old) = slab.insert("first");
        assert_eq!(slab.remove(slot, old), Some("first"));
        let (again, new) = slab.insert("second");
        assert_eq!(again, slot, "the freed slot is reused");
        assert_ne!(new, old);
        assert!(slab.get_mut(slot, old).is_none(), "a late completion for the old one finds nothing");
        assert!(slab.remove(slot, old).is_none());
        assert_eq!(slab.get_mut(slot, new).copied(), Some("second"));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn shrinking_after_a_burst_keeps_live_slots_addressable() {
        let mut slab = Slab::default();
        let keys: Vec<_> = (0..1000).map(|i| slab.insert(i)).collect();
        for &(slot, generation) in &keys[1..] {
            slab.remove(slot, generation);
        }
        slab.shrink();
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.get_mut(keys[0].0, keys[0].1).copied(), Some(0));
        let (slot, generation) = slab.insert(7);
        assert_eq!(slot, 1, "slots past the shrink point are gone from the free list");
        assert_ne!(generation, keys[1].1, "a slot made again does not answer to the old tokens");
        assert!(slab.get_mut(keys[1].0, keys[1].1).is_none());
    }
}
