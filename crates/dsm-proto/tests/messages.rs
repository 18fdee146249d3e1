//! Message counts of the common transactions, on a tiny in-order network.

use dsm_proto::{Access, Action, Engine, Interleaved, LocalAccess, Msg, NodeId, PageId};
use std::collections::VecDeque;

struct Net {
    nodes: Vec<Engine>,
    queue: VecDeque<(NodeId, NodeId, Msg)>,
    log: Vec<String>,
}

impl Net {
    fn new(n: u16) -> Self {
        Net {
            nodes: (0..n)
                .map(|me| Engine::new(me, n, 16, Box::new(Interleaved::new(n))))
                .collect(),
            queue: VecDeque::new(),
            log: Vec::new(),
        }
    }

    fn run(&mut self, node: NodeId, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, msg, .. } => {
                    self.log.push(format!("n{node}->n{to} {}", msg.kind()));
                    self.queue.push_back((node, to, msg));
                }
                Action::Wake { page } => {
                    // The woken thread retries at once; then let the page go.
                    let more = self.nodes[usize::from(node)].release(page).unwrap();
                    self.run(node, more);
                }
                _ => {}
            }
        }
    }

    /// Fault and deliver everything (in order); returns the messages exchanged.
    fn access(&mut self, node: NodeId, page: PageId, access: Access) -> Vec<String> {
        self.log.clear();
        let a = self.nodes[usize::from(node)].fault(page, access).unwrap();
        self.run(node, a);
        while let Some((from, to, msg)) = self.queue.pop_front() {
            let a = self.nodes[usize::from(to)].receive(from, msg).unwrap();
            self.run(to, a);
        }
        assert!(self.nodes.iter().all(Engine::is_quiescent));
        assert!(self.nodes[usize::from(node)]
            .local_access(page)
            .allows(access));
        std::mem::take(&mut self.log)
    }
}

#[test]
fn read_fault_on_home_owned_page_is_request_and_reply() {
    let mut net = Net::new(3);
    assert!(net.access(0, 0, Access::Write).is_empty()); // home's first touch
    assert_eq!(
        net.access(1, 0, Access::Read),
        ["n1->n0 Request", "n0->n1 Data"]
    );
    assert_eq!(net.nodes[0].stats().pages_sent, 1);
    // A page the home never touched travels as a zero page without contents.
    assert_eq!(
        net.access(2, 3, Access::Read),
        ["n2->n0 Request", "n0->n2 Data"]
    );
    assert_eq!(net.nodes[0].stats().zero_pages_sent, 1);
}

#[test]
fn read_fault_on_remote_owned_page_is_three_hops() {
    let mut net = Net::new(3);
    net.access(1, 0, Access::Write);
    assert_eq!(
        net.access(2, 0, Access::Read),
        [
            "n2->n0 Request",
            "n0->n1 Forward",
            "n1->n2 Data",
            "n2->n0 Done"
        ]
    );
    assert_eq!(net.nodes[1].local_access(0), LocalAccess::Read);
}

#[test]
fn write_fault_with_two_sharers() {
    let mut net = Net::new(4);
    net.access(1, 0, Access::Read);
    net.access(2, 0, Access::Read);
    // Sharers: n0 (home), n1, n2. n3 writes: the home invalidates n1 and n2, then
    // (being the supplier) sends its own copy to n3 and drops it.
    assert_eq!(
        net.access(3, 0, Access::Write),
        [
            "n3->n0 Request",
            "n0->n1 Invalidate",
            "n0->n2 Invalidate",
            "n1->n0 InvalidateAck",
            "n2->n0 InvalidateAck",
            "n0->n3 Data"
        ]
    );
    for n in 0..3 {
        assert_eq!(net.nodes[n].local_access(0), LocalAccess::None);
    }
    assert_eq!(net.nodes[0].stats().invalidations_sent, 2);
    // n1 and n2 read it back (from n3, then from n1): sharers n1, n2, n3.
    net.access(1, 0, Access::Read);
    net.access(2, 0, Access::Read);
    // Upgrade of a sharer: the two other sharers are invalidated, no data moves.
    assert_eq!(
        net.access(2, 0, Access::Write),
        [
            "n2->n0 Request",
            "n0->n1 Invalidate",
            "n0->n3 Invalidate",
            "n1->n0 InvalidateAck",
            "n3->n0 InvalidateAck",
            "n0->n2 Grant"
        ]
    );
}
