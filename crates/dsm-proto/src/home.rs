//! Home assignment policies.

use crate::{NodeId, PageId};
use std::fmt::Debug;

/// Decides which node is the home (directory) of a page. Must be a pure function of the
/// page, identical on every node of the cluster.
pub trait HomePolicy: Debug + Send + Sync {
    /// The home node of `page`.
    fn home(&self, page: PageId) -> NodeId;
}

/// Pages are spread round robin: the home of page `p` is `p % nodes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interleaved {
    nodes: u16,
}

impl Interleaved {
    /// Round robin over `nodes` nodes (0 is treated as 1).
    pub fn new(nodes: u16) -> Self {
        Interleaved {
            nodes: nodes.max(1),
        }
    }
}

impl HomePolicy for Interleaved {
    fn home(&self, page: PageId) -> NodeId {
        // The remainder is < nodes <= u16::MAX, so the conversion cannot fail.
        NodeId::try_from(page % u64::from(self.nodes)).unwrap_or(0)
    }
}

/// Every page has its home on one node (typically node 0, the I/O node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllOnNode(pub NodeId);

impl HomePolicy for AllOnNode {
    fn home(&self, _page: PageId) -> NodeId {
        self.0
    }
}

/// Block-wise: the guest memory is cut into `nodes` contiguous blocks of
/// `pages_per_node` pages; block `i` has its home on node `i` (pages past the last block
/// go to the last node). This matches a NUMA-like split of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    pages_per_node: u64,
    nodes: u16,
}

impl Blocked {
    /// Split `pages` pages into `nodes` contiguous blocks.
    pub fn new(pages: u64, nodes: u16) -> Self {
        let nodes = nodes.max(1);
        Blocked {
            pages_per_node: pages.div_ceil(u64::from(nodes)).max(1),
            nodes,
        }
    }
}

impl HomePolicy for Blocked {
    fn home(&self, page: PageId) -> NodeId {
        let block = (page / self.pages_per_node).min(u64::from(self.nodes - 1));
        NodeId::try_from(block).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let i = Interleaved::new(3);
        assert_eq!(
            (0..6).map(|p| i.home(p)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
        assert_eq!(AllOnNode(2).home(12345), 2);
        let b = Blocked::new(10, 3); // 4 pages per node
        assert_eq!(
            (0..12).map(|p| b.home(p)).collect::<Vec<_>>(),
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
        );
    }
}
