//! Did-you-mean: the nearest of a list of known words by edit distance.

/// The candidate closest to `word` (edit distance, ASCII case ignored), if it is close
/// enough to be a plausible typo: at most a third of the word's length, and at least 1.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance between `a` and `b` by characters: insertions, deletions, substitutions and
/// swaps of two neighbours (the optimal string alignment distance).
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d: Vec<Vec<usize>> =
        (0..=a.len()).map(|i| (0..=b.len()).map(|j| if i == 0 { j } else { i }).collect()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_word_and_nonsense_finds_none() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("imgae", "image"), 1);
        let commands = ["image", "status", "toml", "settings", "prepare"];
        assert_eq!(nearest("stauts", commands), Some("status"));
        assert_eq!(nearest("imgae", commands), Some("image"));
        assert_eq!(nearest("setings", commands), Some("settings"));
        assert_eq!(nearest("frobnicate", commands), None);
        assert_eq!(nearest("NSPAWN_RUNNER_MEMORYMAX", ["NSPAWN_RUNNER_MEMORY_MAX"]), Some("NSPAWN_RUNNER_MEMORY_MAX"));
    }
}
