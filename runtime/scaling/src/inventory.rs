//! The machine's GPUs and which worker owns each: a GPU is never given to two workers.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The GPUs a server may hand to workers.
#[derive(Debug, Default)]
pub struct Inventory {
    gpus: Vec<u32>,
    simulated: bool,
    owners: Mutex<BTreeMap<u32, String>>,
}

/// A GPU and its owner, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    /// The device index (`cuda:N`).
    pub index: u32,
    /// The worker holding it (`endpoint/version/worker`), if one does.
    pub owner: Option<String>,
}

impl Inventory {
    /// An inventory of these device indices; `simulated` ones exist only for tests.
    pub fn new(mut gpus: Vec<u32>, simulated: bool) -> Self {
        gpus.sort_unstable();
        gpus.dedup();
        Self {
            gpus,
            simulated,
            owners: Mutex::new(BTreeMap::new()),
        }
    }

    /// Parses `none`, a list of indices such as `0,1,3`, or `fake:N` (N simulated GPUs);
    /// `auto` is resolved by the caller, which can look at the machine.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "none" {
            return Ok(Self::default());
        }
        if let Some(count) = text.strip_prefix("fake:") {
            let count: u32 = count
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| format!("`{text}`: fake:N takes N between 1 and 64"))?;
            return Ok(Self::new((0..count).collect(), true));
        }
        let gpus = text
            .split(',')
            .map(|s| {
                s.trim().parse::<u32>().map_err(|_| {
                    format!("`{text}` is not `auto`, `none`, `fake:N` or a list such as `0,1,3`")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(gpus, false))
    }

    /// How many GPUs there are.
    pub fn total(&self) -> usize {
        self.gpus.len()
    }

    /// Whether the GPUs are simulated.
    pub fn simulated(&self) -> bool {
        self.simulated
    }

    /// How many are not held by a worker.
    pub fn free(&self) -> usize {
        self.gpus.len() - self.lock().len()
    }

    /// Gives `count` free GPUs (the lowest indices) to `owner`, or none when fewer are free.
    pub fn allocate(&self, count: u32, owner: &str) -> Option<Vec<u32>> {
        let mut owners = self.lock();
        let free: Vec<u32> = self
            .gpus
            .iter()
            .copied()
            .filter(|g| !owners.contains_key(g))
            .take(count as usize)
            .collect();
        if free.len() < count as usize {
            return None;
        }
        for g in &free {
            owners.insert(*g, owner.to_owned());
        }
        Some(free)
    }

    /// Takes these GPUs back.
    pub fn release(&self, gpus: &[u32]) {
        let mut owners = self.lock();
        for g in gpus {
            owners.remove(g);
        }
    }

    /// Every GPU and its owner.
    pub fn slots(&self) -> Vec<GpuSlot> {
        let owners = self.lock();
        self.gpus
            .iter()
            .map(|g| GpuSlot {
                index: *g,
                owner: owners.get(g).cloned(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, String>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_is_never_given_twice() {
        let inv = Inventory::parse("fake:8").unwrap();
        let a = inv.allocate(2, "a").unwrap();
        let b = inv.allocate(4, "b").unwrap();
        assert_eq!((a, b.clone()), (vec![0, 1], vec![2, 3, 4, 5]));
        assert_eq!(inv.allocate(4, "c"), None);
        assert_eq!(inv.free(), 2);
        inv.release(&b);
        assert_eq!(inv.allocate(4, "c"), Some(vec![2, 3, 4, 5]));
        assert!(Inventory::parse("0,x").is_err());
        assert_eq!(Inventory::parse("3, 1").unwrap().slots()[0].index, 1);
        assert_eq!(Inventory::parse("none").unwrap().total(), 0);
    }
}
