//! Which node to try next.
//!
//! Order of preference: redirects from the last BYE or KICKED (best first, each tried once), then
//! the list from the last Dispatch answer (ordered by the cluster: load and a stable hash of the
//! user), or, when no Dispatch answer has arrived yet, the static node list from the
//! configuration. Successive attempts rotate through the list, so one dead node costs one attempt.

use std::collections::VecDeque;

#[derive(Debug, Clone, Default)]
pub(crate) struct NodeList {
    /// Client addresses given in the configuration; used until Dispatch answers, and when the
    /// cluster's answer is empty.
    static_nodes: Vec<String>,
    /// Client addresses from the last Dispatch answer, best first.
    dispatched: Vec<String>,
    /// Addresses the server told us to go to (BYE or KICKED redirect), best first; each is
    /// consumed by one attempt.
    redirects: VecDeque<String>,
    /// Index into the active list of the next node to try.
    next: usize,
}

impl NodeList {
    /// `start` offsets the first pick into the static list, so clients configured with the same
    /// static list do not all start on its first node.
    pub(crate) fn new(static_nodes: Vec<String>, start: usize) -> Self {
        let next = if static_nodes.is_empty() {
            0
        } else {
            start % static_nodes.len()
        };
        NodeList {
            static_nodes,
            dispatched: Vec::new(),
            redirects: VecDeque::new(),
            next,
        }
    }

    fn active(&self) -> &[String] {
        if self.dispatched.is_empty() {
            &self.static_nodes
        } else {
            &self.dispatched
        }
    }

    /// Whether there is any node to try.
    pub(crate) fn is_empty(&self) -> bool {
        self.redirects.is_empty() && self.active().is_empty()
    }

    /// The next address to try, rotating through the list.
    pub(crate) fn next(&mut self) -> Option<String> {
        if let Some(r) = self.redirects.pop_front() {
            return Some(r);
        }
        let list = self.active();
        if list.is_empty() {
            return None;
        }
        let i = self.next % list.len();
        let addr = list[i].clone();
        self.next = (i + 1) % list.len();
        Some(addr)
    }

    /// Installs a fresh Dispatch answer. A changed list is tried from its best node again; an
    /// unchanged one keeps rotating where it was.
    pub(crate) fn set_dispatched(&mut self, nodes: Vec<String>) {
        if nodes != self.dispatched {
            self.dispatched = nodes;
            self.next = 0;
        }
    }

    /// The server asked us to go elsewhere: these are tried next, in order, before the list.
    pub(crate) fn redirect(&mut self, addrs: impl IntoIterator<Item = String>) {
        self.redirects.clear();
        for a in addrs {
            if !a.is_empty() && !self.redirects.contains(&a) {
                self.redirects.push_back(a);
            }
        }
    }

    /// The address list currently in use (for logs and tests).
    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.active().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn take(n: &mut NodeList, k: usize) -> Vec<String> {
        (0..k).filter_map(|_| n.next()).collect()
    }

    #[test]
    fn rotates_through_the_static_list_from_the_offset() {
        let mut n = NodeList::new(list(&["a", "b", "c"]), 4);
        assert_eq!(take(&mut n, 5), list(&["b", "c", "a", "b", "c"]));
    }

    #[test]
    fn empty_list_has_nothing() {
        let mut n = NodeList::new(Vec::new(), 3);
        assert!(n.is_empty());
        assert_eq!(n.next(), None);
    }

    #[test]
    fn dispatch_answer_replaces_the_static_list_and_starts_from_its_best() {
        let mut n = NodeList::new(list(&["s1", "s2"]), 1);
        assert_eq!(n.next().as_deref(), Some("s2"));
        n.set_dispatched(list(&["d1", "d2", "d3"]));
        assert_eq!(take(&mut n, 4), list(&["d1", "d2", "d3", "d1"]));
        // The same answer again does not restart the rotation.
        n.set_dispatched(list(&["d1", "d2", "d3"]));
        assert_eq!(n.next().as_deref(), Some("d2"));
        // A changed one does.
        n.set_dispatched(list(&["d3", "d1"]));
        assert_eq!(n.next().as_deref(), Some("d3"));
        // An empty answer falls back to the static list.
        n.set_dispatched(Vec::new());
        assert_eq!(n.snapshot(), list(&["s1", "s2"]));
    }

    #[test]
    fn redirects_come_first_once_each_then_rotation_resumes() {
        let mut n = NodeList::new(list(&["a", "b", "c"]), 0);
        assert_eq!(n.next().as_deref(), Some("a"));
        n.redirect(list(&["x", "", "y", "x"]));
        assert_eq!(take(&mut n, 5), list(&["x", "y", "b", "c", "a"]));
    }

    #[test]
    fn a_new_redirect_replaces_an_unused_one() {
        let mut n = NodeList::new(list(&["a"]), 0);
        n.redirect(list(&["x", "y"]));
        n.redirect(list(&["z"]));
        assert_eq!(take(&mut n, 2), list(&["z", "a"]));
    }
}
