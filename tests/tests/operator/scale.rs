//! Users at scale: many MqttUsers on one broker, spread over several auth
//! files, with the operator binary's own count of its API requests and the
//! CPU it spends per user event.
//!
//! `CIRRUS_SCALE_USERS` users (default 2,000), `CIRRUS_SCALE_FILE_BUDGET`
//! bytes of users per auth file (default 64 KiB, so that the default count
//! needs several files; the 50,000-user run in docs/operator.md uses the
//! operator's own 900 KiB), `CIRRUS_SCALE_EVENTS` user changes measured
//! (default 20).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use cirrus_config::auth::{User, UsersFile};
use futures_util::StreamExt;

use super::*;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) and resident bytes of a process.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces): the
    // third field of the file is the first here.
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let rss_pages: u64 = f[21].parse().unwrap();
    // USER_HZ is 100 on Linux; pages are 4 KiB here.
    (ticks as f64 / 100.0, rss_pages * 4096)
}

/// The value of one series (`name{labels}`) in the operator's metrics.
fn counter(metrics: &str, series: &str) -> u64 {
    let key = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The operator's count of its requests with `verb` on `resource`.
fn requests(metrics: &str, verb: &str, resource: &str) -> u64 {
    counter(
        metrics,
        &format!("cirrus_operator_api_requests_total{{verb=\"{verb}\",resource=\"{resource}\"}}"),
    )
}

/// The reconciles the operator's `controller` ran.
fn reconciles(metrics: &str, controller: &str) -> u64 {
    counter(
        metrics,
        &format!("cirrus_operator_reconciles_total{{controller=\"{controller}\"}}"),
    )
}

/// Every request of `verb`, whatever the resource.
fn all_requests(metrics: &str, verb: &str) -> u64 {
    let key = format!("cirrus_operator_api_requests_total{{verb=\"{verb}\",");
    metrics
        .lines()
        .filter(|l| l.starts_with(&key))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// What the operator asked for between two readings of its metrics, by
/// verb and resource.
fn delta(before: &str, after: &str) -> Vec<String> {
    let count = |t: &str| -> HashMap<String, u64> {
        t.lines()
            .filter_map(|l| l.strip_prefix("cirrus_operator_api_requests_total"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let (b, a) = (count(before), count(after));
    let mut out: Vec<String> = a
        .iter()
        .filter_map(|(k, n)| {
            let d = n - b.get(k).copied().unwrap_or(0);
            (d > 0).then(|| format!("{k} {d}"))
        })
        .collect();
    out.sort();
    out
}

/// The users of each file of the auth volume, and each file's size.
fn parse_volume(files: &[(String, Vec<u8>)]) -> Vec<(String, usize, Vec<User>)> {
    files
        .iter()
        .map(|(name, bytes)| {
            let text = String::from_utf8_lossy(bytes);
            let users = if name == "auth.yaml" {
                AuthFile::from_yaml(&text).unwrap().users
            } else {
                UsersFile::from_yaml(&text).unwrap().users
            };
            (name.clone(), bytes.len(), users)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_spread_over_auth_files_and_a_user_event_reads_no_list() {
    let n: usize = env_or("CIRRUS_SCALE_USERS", 2_000);
    let budget: usize = env_or("CIRRUS_SCALE_FILE_BUDGET", 64 * 1024);
    let events: usize = env_or("CIRRUS_SCALE_EVENTS", 20);
    let resync: u64 = env_or("CIRRUS_SCALE_RESYNC_SECS", 10);
    let c = client().await;
    let ns = namespace(&c, "op-scale").await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], cirrus_e2e::process::free_port()).into();
    let log =
        std::env::temp_dir().join(format!("cirrus-scale-operator-{}.log", std::process::id()));
    eprintln!("scale: the operator logs to {}", log.display());
    let child = std::process::Command::new(cirrus_e2e::process::operator_bin())
        .args(["--namespace", &ns, "--admin", &admin.to_string()])
        .args([
            // A short resync: users that nothing changed must not be
            // reconciled again at this pace (they would crowd out the
            // ones that changed).
            "--resync-secs",
            &resync.to_string(),
            "--user-file-budget",
            &budget.to_string(),
        ])
        .env("KUBECONFIG", cirrus_e2e::k8s::kubeconfig())
        // Its log, for a run that goes wrong.
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = cirrus_e2e::process::KillOnDrop(child);
    let pid = child.0.id();
    let metrics = || async move {
        tokio::task::spawn_blocking(move || cirrus_e2e::process::try_http_get(admin, "/metrics"))
            .await
            .ok()
            .flatten()
            .map(|(_, body)| body)
    };
    eventually(WAIT, "the operator's /metrics", || async {
        metrics().await
    })
    .await;
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: fleet}\nspec: {}\n",
    )
    .await;

    // n users, 32 requests at a time.
    let t0 = Instant::now();
    let api = Api::<MqttUser>::namespaced(c.clone(), &ns);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let u: MqttUser = serde_yaml::from_str(&format!(
                    "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {{name: u-{i:05}}}\nspec: {{brokerRef: fleet, acl: [{{topic: 'devices/%u/#', access: all}}]}}\n"
                ))
                .unwrap();
                for attempt in 0.. {
                    match api.create(&PostParams::default(), &u).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(e)) if e.code == 409 => return,
                        Err(e) if attempt < 10 => {
                            eprintln!("creating u-{i:05}: {e}; again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => panic!("creating u-{i:05}: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let created = t0.elapsed();
    eprintln!("scale: {n} users created in {:.1} s", created.as_secs_f64());

    // Until every user is in the files (read every 2 s: each read is the
    // whole volume).
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 20);
    let files = loop {
        if let Some(v) = auth_volume(&c, &ns, "fleet").await {
            let parsed = parse_volume(&v);
            if parsed.iter().map(|f| f.2.len()).sum::<usize>() == n {
                break parsed;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every user in the auth files in time"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let converged = t0.elapsed();
    let after_fill = metrics().await.unwrap();
    let (cpu_fill, rss) = cpu_and_rss(pid);

    // Each user once, each file within its budget and a Secret's 1 MiB.
    let mut names = HashSet::new();
    let mut file_of: HashMap<String, usize> = HashMap::new();
    for (i, (name, size, users)) in files.iter().enumerate() {
        assert!(*size <= budget.max(4096) + 1024, "{name} is {size} bytes");
        assert!(*size < 1024 * 1024, "{name} is {size} bytes");
        for u in users {
            assert!(names.insert(u.username.clone()), "{} twice", u.username);
            file_of.insert(u.username.clone(), i);
        }
    }
    assert_eq!(names.len(), n);
    let expected_files = (n * 260).div_ceil(budget).max(1);
    if expected_files > 1 {
        assert!(files.len() > 1, "{n} users in one file of {budget} bytes");
    }
    // The watches listed each kind once (pages of 500), not once per user:
    // checked at the end, after the figures are out.
    let fill_lists: Vec<(&str, u64)> = ["mqttusers", "secrets", "mqttbrokers"]
        .iter()
        .map(|r| (*r, requests(&after_fill, "list", r)))
        .collect();
    let fill_gets = all_requests(&after_fill, "get");

    // A real broker on these files admits a user from the first file and
    // one from the last, and refuses a wrong password.
    let (b, dir) = broker_with_auth_of(&c, &ns, "fleet", None).await;
    for f in [&files[0], &files[files.len() - 1]] {
        let user = &f.2[0].username;
        let password = secret_value(&c, &ns, &format!("{user}-mqtt-credentials"), "password").await;
        let (_m, ack) = cirrus_e2e::Client::connect(b.addr, login(user, user, &password)).await;
        assert_eq!(ack.reason_code, 0, "{user} of {}", f.0);
        let (_m, ack) = cirrus_e2e::Client::connect(b.addr, login("x", user, "wrong")).await;
        assert_eq!(
            ack.reason_code,
            cirrus_codec::reason::BAD_USER_NAME_OR_PASSWORD
        );
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);

    eprintln!("scale: every user in the files; now the user events");
    // User events one at a time (an ACL change each, waited for in the
    // file that holds the user): what the operator reads and spends.
    let before = metrics().await.unwrap();
    let (cpu_before, _) = cpu_and_rss(pid);
    let t_events = Instant::now();
    for e in 0..events {
        let user = format!("u-{:05}", e * n / events);
        api.patch(
            &user,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"acl": [
                {"topic": "devices/%u/#", "access": "all"},
                {"topic": format!("extra/{e}/#"), "access": "subscribe"}
            ]}})),
        )
        .await
        .unwrap();
        let i = file_of[&user];
        let (file, secret) = match i {
            0 => ("auth.yaml".to_string(), "fleet-auth".to_string()),
            _ => {
                let name = &files[i].0;
                let k = name.trim_start_matches("users-").trim_end_matches(".yaml");
                ("users.yaml".to_string(), format!("fleet-auth-{k}"))
            }
        };
        eventually(
            Duration::from_secs(30),
            &format!("{user}'s new rule"),
            || async {
                let s: Secret = get(&c, &ns, &secret).await?;
                let bytes = s.data?.remove(&file)?.0;
                let v = parse_volume(&[(if i == 0 { file.clone() } else { "x".into() }, bytes)]);
                let u = v[0].2.iter().find(|u| u.username == user)?;
                (u.acl.len() == 2).then_some(())
            },
        )
        .await;
    }
    let took = t_events.elapsed();
    let after = metrics().await.unwrap();
    let (cpu_after, _) = cpu_and_rss(pid);
    let per = |verb: &str| {
        (all_requests(&after, verb) - all_requests(&before, verb)) as f64 / events as f64
    };
    // Lists of what a user event is about (the pods are listed on a timer
    // for their deletion cost, whatever happens).
    let lists: u64 = ["mqttusers", "secrets", "mqttbrokers"]
        .iter()
        .map(|r| requests(&after, "list", r) - requests(&before, "list", r))
        .sum();
    let cpu_ms = (cpu_after - cpu_before) * 1000.0 / events as f64;
    let reconciles_per = |controller: &str| {
        (reconciles(&after, controller) - reconciles(&before, controller)) as f64 / events as f64
    };
    let user_reconciles = reconciles_per("mqttuser");
    eprintln!(
        "scale: {n} users in {} files (budget {budget} B); created in {:.1} s, all in the auth files after {:.1} s; \
         operator CPU {cpu_fill:.1} s and {} MiB resident after the fill, {fill_gets} gets while filling; \
         per user event: {:.2} gets, {:.2} patches, {:.2} creates, {lists} lists of users, Secrets or brokers in all, {cpu_ms:.1} ms CPU, {user_reconciles:.2} user reconciles, {:.2} broker reconciles; {events} events in {:.1} s",
        files.len(),
        created.as_secs_f64(),
        converged.as_secs_f64(),
        rss / (1024 * 1024),
        per("get"),
        per("patch"),
        per("create"),
        reconciles_per("mqttbroker"),
        took.as_secs_f64(),
    );
    eprintln!(
        "scale: requests during the events: {:?}",
        delta(&before, &after)
    );
    eprintln!("scale: list requests while filling: {fill_lists:?}");
    for (r, lists) in &fill_lists {
        assert!(*lists <= 3, "{lists} lists of {r} while filling");
    }
    // No list per event (the caches answer), a few gets (the broker's
    // children), and a bounded CPU cost.
    assert_eq!(lists, 0, "lists during the user events");
    assert!(per("get") <= 8.0, "{} gets per user event", per("get"));
    assert!(cpu_ms < 2_000.0, "{cpu_ms} ms CPU per user event");
    // The changed user is reconciled (again when its status write comes
    // back), not every user once a resync.
    assert!(
        user_reconciles <= 4.0,
        "{user_reconciles} user reconciles per user event"
    );

    // Nothing was hashed again: every other user's hash is the one it had.
    let end = parse_volume(&auth_volume(&c, &ns, "fleet").await.unwrap());
    let hash_of = |v: &[(String, usize, Vec<User>)]| -> HashMap<String, String> {
        v.iter()
            .flat_map(|f| {
                f.2.iter()
                    .map(|u| (u.username.clone(), u.password_hash.clone()))
            })
            .collect()
    };
    assert_eq!(hash_of(&end), hash_of(&files));
    drop(child);
}
