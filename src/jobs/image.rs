//! Which image a job gets: its `image:` checked against the allowed globs, then the admin's
//! aliases, then the Python nspawn-runner's rule.

use crate::error::{Error, Result};
use crate::names::ImageName;
use crate::settings::{split_list, Settings};

/// Longest job `image:` looked at; longer ones are refused before any glob runs on them.
const MAX_JOB_IMAGE: usize = 255;

/// The image chosen for a job, and how, for the error that names what was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChoice {
    pub name: ImageName,
    /// e.g. `job image "registry.example.com/ci/debian:bookworm" -> bookworm (its tag)`.
    pub how: String,
}

/// Chooses the image of a job: `by_hand` (prepare's `--image`) as it is, else the job's
/// `image:` (`job_image`), else NSPAWN_RUNNER_DEFAULT_IMAGE.
pub fn choose(by_hand: Option<&str>, job_image: Option<&str>, settings: &Settings) -> Result<ImageChoice> {
    if let Some(name) = by_hand {
        return Ok(ImageChoice { name: ImageName::parse(name)?, how: format!("--image {name}") });
    }
    let job_image = job_image.unwrap_or("").trim();
    if job_image.is_empty() {
        let name = ImageName::parse(&settings.default_image).map_err(|e| e.context("NSPAWN_RUNNER_DEFAULT_IMAGE"))?;
        return Ok(ImageChoice { how: format!("no job image -> {name} (NSPAWN_RUNNER_DEFAULT_IMAGE)"), name });
    }
    if job_image.len() > MAX_JOB_IMAGE {
        return Err(Error::new(format!("job image is longer than {MAX_JOB_IMAGE} characters")));
    }
    let allowed = split_list(settings.allowed_images.as_deref().unwrap_or(""));
    if !allowed.is_empty() && !allowed.iter().any(|glob| glob_matches(glob, job_image)) {
        return Err(Error::new(format!(
            "job image {job_image:?} is not allowed (NSPAWN_RUNNER_ALLOWED_IMAGES: {})",
            allowed.join(", ")
        )));
    }
    for (pattern, target) in aliases(settings.image_aliases.as_deref().unwrap_or(""))? {
        if glob_matches(&pattern, job_image) {
            return Ok(ImageChoice {
                how: format!("job image {job_image:?} -> {target} (alias {pattern})"),
                name: target,
            });
        }
    }
    let (name, part) = python_runner_name(job_image);
    let name = ImageName::parse(name).map_err(|e| e.context(format!("job image {job_image:?}")))?;
    Ok(ImageChoice { how: format!("job image {job_image:?} -> {name} ({part})"), name })
}

/// The Python nspawn-runner's mapping (its PR #7): the last path component, and of that the
/// tag, or the name when there is no tag (`os.path.basename(image).split(":", 2)[-1]`). A
/// digest (`@sha256:...`) is dropped first, where the Python runner would take its hex.
/// Returns the name and which part of the image it is.
pub fn python_runner_name(job_image: &str) -> (&str, &'static str) {
    let last = job_image.rsplit('/').next().unwrap_or(job_image);
    let last = last.split('@').next().unwrap_or(last);
    let parts: Vec<&str> = last.splitn(3, ':').collect();
    let part = if parts.len() > 1 { "its tag" } else { "its name" };
    (parts.last().copied().unwrap_or(last), part)
}

/// Parses NSPAWN_RUNNER_IMAGE_ALIASES: `PATTERN=IMAGE` entries separated by commas.
pub fn aliases(table: &str) -> Result<Vec<(String, ImageName)>> {
    let entries = table.split(',').map(str::trim).filter(|e| !e.is_empty());
    entries
        .map(|entry| {
            let invalid = |why: String| Error::new(format!("NSPAWN_RUNNER_IMAGE_ALIASES entry {entry:?}: {why}"));
            let (pattern, image) = entry.split_once('=').ok_or_else(|| invalid("expected PATTERN=IMAGE".to_owned()))?;
            let (pattern, image) = (pattern.trim(), image.trim());
            if pattern.is_empty() {
                return Err(invalid("empty pattern".to_owned()));
            }
            let image = ImageName::parse(image).map_err(|e| invalid(e.to_string()))?;
            Ok((pattern.to_owned(), image))
        })
        .collect()
}

/// Glob match of the whole `text`, like the Docker executor's `allowed_images`: `*` is any run
/// of characters but `/`, `**` any run at all, `?` one character but `/`; the rest is literal.
/// Dynamic programming over (pattern, text) positions: time is their product, whatever the text.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let tokens = tokenize(pattern.as_bytes());
    let text = text.as_bytes();
    // matches[j]: tokens[i..] matches text[j..], for the current i (from the end).
    let mut matches: Vec<bool> = (0..=text.len()).map(|j| j == text.len()).collect();
    for token in tokens.iter().rev() {
        let mut next = vec![false; text.len() + 1];
        for j in (0..=text.len()).rev() {
            next[j] = match token {
                Token::AnyRun => matches[j] || (j < text.len() && next[j + 1]),
                Token::RunInComponent => matches[j] || (j < text.len() && text[j] != b'/' && next[j + 1]),
                Token::One => j < text.len() && text[j] != b'/' && matches[j + 1],
                Token::Literal(c) => j < text.len() && text[j] == *c && matches[j + 1],
            };
        }
        matches = next;
    }
    matches[0]
}

enum Token {
    /// `**`
    AnyRun,
    /// `*`
    RunInComponent,
    /// `?`
    One,
    Literal(u8),
}

fn tokenize(mut pattern: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::new();
    while let Some((&c, rest)) = pattern.split_first() {
        pattern = rest;
        tokens.push(match c {
            b'*' if pattern.first() == Some(&b'*') => {
                pattern = &pattern[1..];
                Token::AnyRun
            }
            b'*' => Token::RunInComponent,
            b'?' => Token::One,
            c => Token::Literal(c),
        });
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    fn mapped(job_image: &str) -> Result<String> {
        choose(None, Some(job_image), &settings(&[])).map(|c| c.name.to_string())
    }

    #[test]
    fn job_images_map_like_the_python_runner() {
        for (job_image, name) in [
            ("registry.example.com/ci/debian:bookworm", "bookworm"),
            ("registry.salsa.debian.org/salsa-ci-team/pipeline/base:unstable", "unstable"),
            ("base:unstable", "unstable"),
            ("debian", "debian"),
            ("debian:latest", "latest"),
            ("host:5000/img:tag", "tag"),
            ("host:5000/group/img", "img"),
            ("debian@sha256:0123abcd", "debian"),
            ("debian:bookworm@sha256:0123abcd", "bookworm"),
            ("a:b:c", "c"),
            ("/etc", "etc"),
        ] {
            assert_eq!(mapped(job_image).unwrap(), name, "{job_image}");
        }
    }

    #[test]
    fn hostile_job_images_are_refused() {
        for bad in ["x/..", "x:..", "x/.hidden", "img:", "img/", "a:b:c:d", "x:ü", "x:a b", &"x".repeat(300)] {
            assert!(mapped(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn no_image_is_the_default_and_by_hand_is_taken_as_it_is() {
        let s = settings(&[("NSPAWN_RUNNER_DEFAULT_IMAGE", "bookworm")]);
        assert_eq!(choose(None, None, &s).unwrap().name.as_str(), "bookworm");
        assert_eq!(choose(None, Some("  "), &s).unwrap().name.as_str(), "bookworm");
        assert_eq!(choose(Some("other"), Some("debian:trixie"), &s).unwrap().name.as_str(), "other");
        assert!(choose(Some("a:b"), None, &s).is_err());
        assert!(choose(None, None, &settings(&[("NSPAWN_RUNNER_DEFAULT_IMAGE", "../x")])).is_err());
    }

    #[test]
    fn aliases_come_first_and_are_validated() {
        let s = settings(&[(
            "NSPAWN_RUNNER_IMAGE_ALIASES",
            "debian:bookworm=bookworm, **/ubuntu:*=ubuntu ,ubuntu:*=ubuntu",
        )]);
        let pick = |i: &str| choose(None, Some(i), &s).unwrap();
        assert_eq!(pick("debian:bookworm").name.as_str(), "bookworm");
        assert_eq!(pick("docker.io/library/ubuntu:24.04").name.as_str(), "ubuntu");
        assert_eq!(pick("ubuntu:24.04").name.as_str(), "ubuntu");
        assert!(pick("ubuntu:24.04").how.contains("alias ubuntu:*"));
        assert_eq!(pick("debian:trixie").name.as_str(), "trixie");
        for bad in ["nope", "=x", "a=../x", "a=b:c"] {
            assert!(aliases(bad).is_err(), "{bad:?} accepted");
        }
        let bad = settings(&[("NSPAWN_RUNNER_IMAGE_ALIASES", "x=.hidden")]);
        assert!(choose(None, Some("x"), &bad).unwrap_err().to_string().contains("NSPAWN_RUNNER_IMAGE_ALIASES"));
    }

    #[test]
    fn only_allowed_images_pass() {
        let s = settings(&[("NSPAWN_RUNNER_ALLOWED_IMAGES", "debian:*, registry.example.com/**")]);
        let ok = |i: &str| choose(None, Some(i), &s).is_ok();
        assert!(ok("debian:bookworm") && ok("registry.example.com/ci/x:trixie"));
        assert!(!ok("evil/debian:bookworm") && !ok("ubuntu:24.04") && !ok("debian:x/y"));
        assert!(ok("") && choose(Some("other"), Some("ubuntu"), &s).is_ok());
        let e = choose(None, Some("ubuntu"), &s).unwrap_err().to_string();
        assert!(e.contains("not allowed") && e.contains("debian:*"), "{e}");
    }

    #[test]
    fn globs_match_whole_strings_within_path_components() {
        assert!(glob_matches("debian:*", "debian:bookworm"));
        assert!(!glob_matches("debian:*", "debian:a/b"));
        assert!(glob_matches("**", "a/b/c"));
        assert!(glob_matches("a?c", "abc") && !glob_matches("a?c", "a/c"));
        assert!(!glob_matches("debian", "debian:x") && !glob_matches("debian", "xdebian"));
        assert!(glob_matches("*/*:*", "ci/debian:bookworm"));
        assert!(glob_matches("a**b", "a/x/b") && glob_matches("a**", "a") && !glob_matches("a*b", "a/b"));
        // no backtracking: a hostile text cannot make matching slow
        assert!(!glob_matches("*a*a*a*a*a*a*a*b", &"a".repeat(255)));
    }
}
