//! Random steps over a small world, so that VIPs meet often.

use std::net::SocketAddr;

use unidler_tests::rng::Rng;

use super::world::{
    BACKENDS, GROUPS, KEYS, LBS, LbSpec, OPTION_VALUES, PORTS, PROTOCOLS, PortSpec, Step,
    TUNNEL_KEYS, World,
};

/// The generator: random steps over a small world, so that VIPs meet often.
pub struct Generator {
    pub rng: Rng,
    pub world: World,
}

impl Generator {
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.below(from.len())]
    }

    pub fn datapaths(&mut self) -> Vec<usize> {
        (0..TUNNEL_KEYS.len())
            .filter(|_| self.rng.below(3) == 0)
            .collect()
    }

    /// VIPs for one load balancer: up to four, no two of them the same VIP (two spellings
    /// of one VIP in one load balancer are ambiguous in OVN too).
    pub fn vips(&mut self) -> Vec<(&'static str, &'static str)> {
        let mut vips: Vec<(&'static str, &'static str)> = Vec::new();
        for _ in 0..1 + self.rng.below(4) {
            let key = self.pick(&KEYS);
            let same = |k: &str| match (k.parse::<SocketAddr>(), key.parse::<SocketAddr>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => k == key,
            };
            if vips.iter().any(|(k, _)| same(k)) {
                continue;
            }
            let value = self.pick(&BACKENDS);
            vips.push((key, value));
        }
        vips
    }

    pub fn lb(&mut self) -> LbSpec {
        LbSpec {
            vips: self.vips(),
            protocol: self.pick(&PROTOCOLS),
            datapaths: self.datapaths(),
            group: (self.rng.below(2) == 0).then(|| self.rng.below(GROUPS)),
            event: match self.rng.below(3) {
                0 => None,
                _ => self.pick(&OPTION_VALUES),
            },
            reject: match self.rng.below(4) {
                0 => self.pick(&OPTION_VALUES),
                _ => None,
            },
        }
    }

    /// A change to load balancer `i` as it is: one VIP's backends, a VIP added or removed,
    /// its options, its datapaths.
    pub fn changed_lb(&mut self, mut lb: LbSpec) -> LbSpec {
        match self.rng.below(5) {
            0 if !lb.vips.is_empty() => {
                let at = self.rng.below(lb.vips.len());
                lb.vips[at].1 = self.pick(&BACKENDS);
            }
            1 => {
                let extra = self.vips();
                for (key, value) in extra {
                    let same = |k: &str| match (k.parse::<SocketAddr>(), key.parse::<SocketAddr>())
                    {
                        (Ok(a), Ok(b)) => a == b,
                        _ => k == key,
                    };
                    if !lb.vips.iter().any(|(k, _)| same(k)) {
                        lb.vips.push((key, value));
                    }
                }
            }
            2 if !lb.vips.is_empty() => {
                let at = self.rng.below(lb.vips.len());
                lb.vips.remove(at);
            }
            3 => {
                lb.event = self.pick(&OPTION_VALUES);
                lb.reject = self.pick(&OPTION_VALUES);
            }
            _ => {
                lb.datapaths = self.datapaths();
                lb.group = (self.rng.below(2) == 0).then(|| self.rng.below(GROUPS));
            }
        }
        lb
    }

    pub fn step(&mut self) -> Step {
        let step = match self.rng.below(20) {
            0..=5 => Step::SetLb(self.rng.below(LBS), self.lb()),
            6..=10 => {
                let i = self.rng.below(LBS);
                match self.world.lbs.get(&i).cloned() {
                    Some(lb) => Step::SetLb(i, self.changed_lb(lb)),
                    None => Step::SetLb(i, self.lb()),
                }
            }
            11..=12 => Step::DeleteLb(self.rng.below(LBS)),
            13..=15 => Step::SetPort(
                self.rng.below(PORTS),
                PortSpec {
                    datapath: self.rng.below(TUNNEL_KEYS.len()),
                    bound: self.rng.below(5) < 3,
                },
            ),
            16..=18 => Step::SetGroup(self.rng.below(GROUPS), self.datapaths()),
            _ => Step::SetGlobalEvent(match self.rng.below(3) {
                0 => self.pick(&OPTION_VALUES),
                _ => None,
            }),
        };
        self.world.apply(&step);
        step
    }
}
