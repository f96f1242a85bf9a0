//! Every bundled recipe loads (no unknown key, valid values), names a method that exists, and
//! points at local data files that exist: a user who copies one never starts from a typo.
use std::path::{Path, PathBuf};
use unlearn::methods;
use unlearn::recipe::{AttributeRecipe, Recipe, TrainRecipe};

fn recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            recipes(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

/// A data path must exist unless it is a hub file.
fn assert_exists(recipe: &Path, data: &str) {
    assert!(
        data.starts_with("hf://") || Path::new(data).exists(),
        "{}: data file {data} does not exist",
        recipe.display()
    );
}

#[test]
fn every_bundled_recipe_loads_and_names_a_known_method() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut all = vec![];
    recipes(&root, &mut all);
    all.sort();
    assert!(all.len() >= 30, "{} recipes found", all.len());
    let (mut runs, mut trains, mut attributes) = (0, 0, 0);
    for path in &all {
        let shown = path.display();
        if path.parent().is_some_and(|p| p.ends_with("build")) {
            let r = TrainRecipe::load(path, &[]).unwrap_or_else(|e| panic!("{shown}: {e}"));
            r.data.train.iter().for_each(|d| assert_exists(path, d));
            trains += 1;
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("attribute"))
        {
            let r = AttributeRecipe::load(path, &[]).unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert_exists(path, &r.data.forget);
            r.data
                .retain
                .to_vec()
                .iter()
                .for_each(|d| assert_exists(path, d));
            attributes += 1;
        } else {
            let r = Recipe::load(path, &[]).unwrap_or_else(|e| panic!("{shown}: {e}"));
            methods::build(&r.method.name, &r.method.params)
                .unwrap_or_else(|e| panic!("{shown}: {e}"));
            r.lora_config().unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert_exists(path, &r.data.forget);
            if let Some(retain) = &r.data.retain {
                retain.to_vec().iter().for_each(|d| assert_exists(path, d));
            }
            runs += 1;
        }
    }
    assert!(
        runs >= 25 && trains >= 3 && attributes >= 3,
        "{runs} {trains} {attributes}"
    );
}
