//! Core lists: which CPU cores the reactors run on.
//!
//! Operators write core lists the way `taskset` and SPDK do (`0-1`, `0,2`, `0-3,8`);
//! [`CoreList::parse`] turns one into an ordered, duplicate-free list, and
//! [`CoreList::validate`] checks every core against the cores this process may use.

use std::fmt;
use std::str::FromStr;

use crate::error::ReactorError;

/// An ordered list of distinct CPU core numbers, one reactor per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(Vec<usize>);

impl CoreList {
    /// Parses `0-1`, `0,2`, `0-3,8`; rejects empty lists, reversed ranges and repeats.
    pub fn parse(text: &str) -> Result<Self, ReactorError> {
        let bad = |reason: &str| ReactorError::CoreListSyntax {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let mut cores = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad("empty element"));
            }
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let lo: usize = lo.parse().map_err(|_| bad("not a core number"))?;
            let hi: usize = hi.parse().map_err(|_| bad("not a core number"))?;
            if lo > hi {
                return Err(bad("range runs backwards"));
            }
            if hi - lo >= 4096 {
                return Err(bad("range too long"));
            }
            for core in lo..=hi {
                if cores.contains(&core) {
                    return Err(bad("core listed twice"));
                }
                cores.push(core);
            }
        }
        Ok(Self(cores))
    }

    /// A list of exactly these cores (order kept); duplicates are an error.
    pub fn from_cores(cores: &[usize]) -> Result<Self, ReactorError> {
        let text = cores
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Self::parse(&text)
    }

    /// Every core this process is allowed to run on (its CPU affinity mask).
    pub fn available() -> Vec<usize> {
        let mut ids: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// All cores this process may use, as a list.
    pub fn all_available() -> Result<Self, ReactorError> {
        let cores = Self::available();
        if cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        Ok(Self(cores))
    }

    /// Checks that every listed core exists and this process may run on it.
    pub fn validate(&self) -> Result<(), ReactorError> {
        let available = Self::available();
        match self.0.iter().find(|c| !available.contains(c)) {
            Some(&core) => Err(ReactorError::CoreUnavailable { core, available }),
            None => Ok(()),
        }
    }

    /// The cores, in the order given.
    pub fn cores(&self) -> &[usize] {
        &self.0
    }

    /// Number of cores (and so of reactors).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the list names no core (never true for a parsed list).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for CoreList {
    type Err = ReactorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CoreList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_lists() {
        assert_eq!(CoreList::parse("0-1").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreList::parse("0,2").unwrap().cores(), &[0, 2]);
        assert_eq!(CoreList::parse(" 3 , 0-1 ").unwrap().cores(), &[3, 0, 1]);
        assert_eq!(CoreList::parse("5").unwrap().to_string(), "5");
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in ["", "a", "1-0", "0,,1", "0,0", "0-1,1", "-1", "0-99999"] {
            assert!(
                matches!(
                    CoreList::parse(bad),
                    Err(ReactorError::CoreListSyntax { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn missing_core_is_a_clear_error() {
        let list = CoreList::parse("4095").unwrap();
        let err = list.validate().unwrap_err();
        assert!(matches!(
            err,
            ReactorError::CoreUnavailable { core: 4095, .. }
        ));
        assert!(err.to_string().contains("4095"), "{err}");
    }
}
