//! The Docker provider: running containers from the Docker Engine API on its Unix socket, and
//! their tags as the Agent's tagger gives them.
//!
//! The request is HTTP/1.0 with `Connection: close`, so the Engine answers with a plain body
//! that ends with the connection (HTTP/1.0 has no chunked encoding); `httparse` reads the head.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{image_tags, Entities, EntityTags};

/// Largest answer read: the running containers of one host.
const MAX_ANSWER: u64 = 64 << 20;

/// `DOCKER_HOST` → the socket path; only `unix://` is supported.
pub fn socket_of(docker_host: &str) -> Result<PathBuf, String> {
    match docker_host.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "'{docker_host}' is not unix:///path/to/docker.sock (only a local Unix socket is supported)"
        )),
    }
}

/// Asks the Engine for its running containers.
pub fn fetch(socket: &Path, timeout: Duration) -> Result<Entities, String> {
    let body = get(socket, "/containers/json", timeout)
        .map_err(|e| format!("docker at {}: {e}", socket.display()))?;
    containers(&body)
}

fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut answer)
        .map_err(|e| e.to_string())?;
    if answer.len() as u64 > MAX_ANSWER {
        return Err(format!("answer over {MAX_ANSWER} bytes"));
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the answer ended inside its head".into()),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    if response.code != Some(200) {
        return Err(format!("answered HTTP {}", response.code.unwrap_or(0)));
    }
    let chunked = response
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding") && h.value != b"identity");
    if chunked {
        return Err("answered with a transfer encoding to an HTTP/1.0 request".into());
    }
    Ok(answer.split_off(head))
}

/// The tags of every container in a `/containers/json` answer.
pub fn containers(body: &[u8]) -> Result<Entities, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("/containers/json is not JSON: {e}"))?;
    let list = v.as_array().ok_or("/containers/json is not a list")?;
    let mut out = Entities::default();
    for c in list {
        let id = c["Id"].as_str().unwrap_or_default();
        if id.is_empty() {
            continue;
        }
        out.containers.insert(id.into(), container_tags(c, id));
    }
    Ok(out)
}

/// The standard tags Docker labels carry.
const LABELS: [(&str, &str); 3] = [
    ("com.datadoghq.tags.env", "env"),
    ("com.datadoghq.tags.service", "service"),
    ("com.datadoghq.tags.version", "version"),
];

fn container_tags(c: &Value, id: &str) -> EntityTags {
    let mut t = EntityTags::default();
    let image = c["Image"].as_str().unwrap_or_default();
    image_tags(&mut t, image);
    t.low("image_id", c["ImageID"].as_str().unwrap_or_default());
    let (name, _, tag) = super::split_image(image);
    let docker_image = if tag.is_empty() {
        name.to_string()
    } else {
        format!("{name}:{tag}")
    };
    t.low("docker_image", &docker_image);
    let labels = &c["Labels"];
    for (label, tag) in LABELS {
        t.low(tag, labels[label].as_str().unwrap_or_default());
    }
    // `com.datadoghq.ad.tags`: a JSON list of extra tags.
    if let Some(extra) = labels["com.datadoghq.ad.tags"].as_str() {
        if let Ok(Value::Array(list)) = serde_json::from_str(extra) {
            for tag in list.iter().filter_map(Value::as_str) {
                if !tag.is_empty() && !t.low.iter().any(|t| &**t == tag) {
                    t.low.push(tag.into());
                }
            }
        }
    }
    let name = c["Names"][0].as_str().unwrap_or_default();
    t.high("container_name", name.strip_prefix('/').unwrap_or(name));
    t.high("container_id", id);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tagger::Cardinality;

    #[test]
    fn docker_host_must_be_a_unix_socket() {
        assert_eq!(
            socket_of("unix:///var/run/docker.sock"),
            Ok(PathBuf::from("/var/run/docker.sock"))
        );
        assert!(socket_of("tcp://127.0.0.1:2375").is_err());
        assert!(socket_of("unix://relative").is_err());
    }

    #[test]
    fn a_container_gets_the_agents_tags() {
        let body = br#"[{"Id":"d0c","Names":["/web_1"],"Image":"redis:7","ImageID":"sha256:aa",
            "Labels":{"com.datadoghq.tags.service":"cache","com.datadoghq.ad.tags":"[\"team:db\"]"}}]"#;
        let s = containers(body).unwrap();
        assert_eq!(
            s.containers["d0c"]
                .at(Cardinality::High)
                .collect::<Vec<_>>(),
            [
                "image_name:redis",
                "short_image:redis",
                "image_tag:7",
                "image_id:sha256:aa",
                "docker_image:redis:7",
                "service:cache",
                "team:db",
                "container_name:web_1",
                "container_id:d0c",
            ]
        );
    }

    #[test]
    fn the_engine_api_is_asked_over_its_socket() {
        let dir = std::env::temp_dir().join(format!("whippet-docker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = [0u8; 512];
            let n = s.read(&mut head).unwrap();
            let body = r#"[{"Id":"x1","Names":["/a"],"Image":"app"}]"#;
            write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}"
            )
            .unwrap();
            String::from_utf8_lossy(&head[..n]).into_owned()
        });
        let s = fetch(&path, Duration::from_secs(5)).unwrap();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /containers/json HTTP/1.0\r\n"),
            "{request}"
        );
        assert_eq!(
            s.containers["x1"].high,
            ["container_name:a".into(), "container_id:x1".into()] as [Box<str>; 2]
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(fetch(&path, Duration::from_secs(1)).is_err());
    }
}
