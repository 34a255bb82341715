//! The README's Layout section is the map of `src/`: it names every folder with one sentence and
//! every module in its folder's entry, so a module added without a word there fails here. Each
//! file keeps one job, which in practice means it stays under about 500 lines.

use std::collections::BTreeMap;
use std::path::Path;

const MAX_LINES: usize = 500;

/// The Layout section's list items, by the folder (or file) their entry opens with.
fn layout_entries(readme: &str) -> BTreeMap<String, String> {
    let section =
        readme.split("\n## ").find(|s| s.starts_with("Layout\n")).expect("README.md has a `## Layout` section");
    let mut items: Vec<String> = Vec::new();
    for line in section.lines().skip(1) {
        if let Some(item) = line.strip_prefix("- ") {
            items.push(item.to_owned());
        } else if line.starts_with("  ") && !items.is_empty() {
            let last = items.last_mut().unwrap();
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    items
        .into_iter()
        .filter_map(|item| {
            let name = item.strip_prefix('`')?.split('`').next()?.to_owned();
            Some((name, item))
        })
        .collect()
}

/// Module names (file stems, `mod.rs` aside) of one folder, and every file's line count.
fn modules(dir: &Path) -> (Vec<String>, Vec<(String, usize)>) {
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let lines = std::fs::read_to_string(&path).unwrap().lines().count();
            sizes.push((path.display().to_string(), lines));
            if stem != "mod" {
                names.push(stem);
            }
        }
    }
    names.sort();
    (names, sizes)
}

#[test]
fn the_readme_layout_names_every_folder_and_module_of_src() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let entries = layout_entries(&readme);
    let src = root.join("src");
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            folders.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    folders.sort();
    assert!(folders.len() >= 5, "src/ is laid out in folders by layer: {folders:?}");

    let mut missing = Vec::new();
    for folder in &folders {
        let key = format!("{folder}/");
        let Some(entry) = entries.get(&key) else {
            missing.push(format!("no entry for `{key}`"));
            continue;
        };
        for module in modules(&src.join(folder)).0 {
            if !entry.contains(&format!("`{module}`")) {
                missing.push(format!("`{key}` does not name `{module}`"));
            }
        }
    }
    for name in entries.keys() {
        if let Some(folder) = name.strip_suffix('/') {
            if !folders.iter().any(|f| f == folder) {
                missing.push(format!("`{name}` is in the README but not in src/"));
            }
        }
    }
    // Files directly under src/ are named in one entry that opens with one of them.
    let (top, _) = modules(&src);
    for module in top {
        if !entries.values().any(|e| e.contains(&format!("`{module}.rs`"))) {
            missing.push(format!("no entry names `{module}.rs`"));
        }
    }
    assert!(missing.is_empty(), "README.md's Layout is out of date:\n{}", missing.join("\n"));
}

#[test]
fn every_source_file_stays_small_enough_to_have_one_job() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sizes = modules(&src).1;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sizes.extend(modules(&path).1);
        }
    }
    let large: Vec<_> = sizes.iter().filter(|(_, lines)| *lines > MAX_LINES).collect();
    assert!(large.is_empty(), "files over {MAX_LINES} lines (split them along their jobs): {large:?}");
}
