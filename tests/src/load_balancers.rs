//! Many Southbound Load_Balancer rows, written straight into the database with our OVSDB
//! client (no ovn-northd), for scale tests and benchmarks.

use std::time::Duration;

use ovsdb::{Client, ClientOptions, Condition, Operation, Remote, Row, Value};

use crate::ovsdb_server::{OvsdbServer, SB_DB};

/// Load balancers `lb0`, `lb1`, ... with `per_lb` VIPs each and `options:event=true`; VIP `n`
/// (counting over all load balancers) is `10.(100 + n/65536).(n/256 % 256).(n % 256):80/tcp`.
pub struct LoadBalancers {
    rt: tokio::runtime::Runtime,
    client: Client,
    per_lb: u32,
}

impl LoadBalancers {
    /// Connects to `sb` and inserts `total / per_lb` load balancers, all idle, in one transaction.
    #[track_caller]
    pub fn insert(sb: &OvsdbServer, total: u32, per_lb: u32) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let mut o = ClientOptions::new(Remote::parse_list(&sb.unix_remote()).unwrap(), SB_DB);
            o.leader_only = false;
            let c = Client::start(o).unwrap();
            c.wait_connected(Duration::from_secs(10)).await.unwrap();
            c
        });
        let lbs = Self { rt, client, per_lb };
        let ops: Vec<Operation> = (0..total / per_lb)
            .map(|i| Operation::Insert {
                table: "Load_Balancer".into(),
                row: lbs.row(i, ""),
                uuid_name: None,
            })
            .collect();
        lbs.rt.block_on(lbs.client.transact(&ops)).unwrap();
        lbs
    }

    /// Gives every VIP of load balancer `index` the backends `backends` (one transaction).
    #[track_caller]
    pub fn set_backends(&self, index: u32, backends: &str) {
        let vips = self.row(index, backends).remove("vips").unwrap();
        self.rt
            .block_on(self.client.transact(&[Operation::Update {
                table: "Load_Balancer".into(),
                conditions: vec![Condition::eq("name", format!("lb{index}").as_str())],
                row: Row::from([("vips".to_owned(), vips)]),
            }]))
            .unwrap();
    }

    fn row(&self, index: u32, backends: &str) -> Row {
        let vips: Vec<(String, String)> = (0..self.per_lb)
            .map(|j| {
                let n = index * self.per_lb + j;
                let vip = format!("10.{}.{}.{}:80", 100 + n / 65536, (n / 256) % 256, n % 256);
                (vip, backends.to_owned())
            })
            .collect();
        Row::from([
            (
                "name".to_owned(),
                Value::from(format!("lb{index}").as_str()),
            ),
            (
                "vips".to_owned(),
                Value::string_map(vips.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            ),
            ("protocol".to_owned(), Value::from("tcp")),
            ("options".to_owned(), Value::string_map([("event", "true")])),
        ])
    }
}
