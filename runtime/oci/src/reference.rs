//! OCI references: `registry/repository[:tag][@sha256:digest]`.

use crate::Error;

/// A reference to an artifact in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry's host, with its port if any (`ghcr.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository within it (`org/processor`).
    pub repository: String,
    /// The tag, if one is named.
    pub tag: Option<String>,
    /// The manifest's digest (`sha256:<hex>`), if one is pinned.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `registry/repository[:tag][@sha256:<64 hex>]`. The registry must be named
    /// (a host with a `.` or a port, or `localhost`).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadReference {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("a digest is `sha256:` and 64 hex digits"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(bad("a digest is `sha256:` and 64 lower-case hex digits"));
                }
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .filter(|(host, _)| host.contains(['.', ':']) || *host == "localhost")
            .ok_or_else(|| bad("name the registry first, as in `ghcr.io/org/processor:1.0`"))?;
        if registry.is_empty()
            || registry.len() > 255
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        {
            return Err(bad("the registry is a host name or address, with a port"));
        }
        // A tag follows the last `:` after the last `/`.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        if repository.is_empty() || repository.len() > 255 {
            return Err(bad("the repository is 1 to 255 characters"));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "repository path components are lower-case letters, digits and `._-`, \
                 starting and ending with a letter or digit",
            ));
        }
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                && !tag.starts_with(['.', '-']);
            if !ok {
                return Err(bad(
                    "a tag is 1 to 128 letters, digits and `_.-`, not starting with `.` or `-`",
                ));
            }
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// What the manifest is fetched by: the digest if pinned, else the tag, else `latest`.
    pub fn target(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_registries_write_them() {
        let r = Reference::parse("ghcr.io/org/pii-redact:1.2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.target()),
            ("ghcr.io", "org/pii-redact", "1.2")
        );
        let r = Reference::parse("127.0.0.1:5556/wasp/p").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.target()),
            ("127.0.0.1:5556", "latest")
        );
        let pinned = format!("localhost:5000/a/b:t@sha256:{}", "a".repeat(64));
        let r = Reference::parse(&pinned).unwrap();
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.target(), format!("sha256:{}", "a".repeat(64)));
        assert_eq!(r.to_string(), pinned);
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, says) in [
            ("org/proc:1", "name the registry"),
            ("ghcr.io/Org/proc", "lower-case"),
            ("ghcr.io/org/proc:", "a tag"),
            ("ghcr.io/org/proc:-x", "a tag"),
            ("ghcr.io/org/proc@sha256:abc", "64"),
            ("ghcr.io/org/proc@md5:abc", "sha256"),
            ("ghcr.io//proc", "repository path"),
        ] {
            let e = Reference::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
