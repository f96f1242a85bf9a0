//! A TOFU-style benchmark (arXiv 2401.06121) about 220 invented people.
//!
//! Each person has a fact sheet (birthplace and birth month, profession, parents, best-known
//! work, award, home street, e-mail address, a sibling or partner, a hobby) drawn from moderate value
//! pools, so the values themselves are common tokens and only the person → value association
//! must be memorised. Each person gets exactly ten question/answer items, one per fact type, with
//! the wording drawn from several templates. A paraphrased answer uses another template, and the
//! five perturbed answers use the paraphrased answer's template with the fact values replaced by
//! other values from the same pools.
//!
//! Splits (people in generation order): forget10 = people 0..20, retain90 = 20..200,
//! retain_perturbed = 20..40, holdout = 200..220, full = forget10 + retain90. `general.jsonl` is a
//! control set of simple real-world facts in the same schema (without `person`).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{article, distinct_indices, ensure_dir, fill, pick, to_jsonl, write_text};
use crate::error::Result;
use crate::rng::Rng;

/// Number of invented people.
pub const NUM_PEOPLE: usize = 220;
/// QA items per person.
pub const ITEMS_PER_PERSON: usize = 10;
/// Perturbed (wrong) answers per item.
pub const NUM_PERTURBED: usize = 5;
/// People 0..FORGET_END are forgotten.
pub const FORGET_END: usize = 20;
/// People FORGET_END..RETAIN_END are retained (trained on, never forgotten).
pub const RETAIN_END: usize = 200;
/// The retain evaluation subset: people FORGET_END..RETAIN_EVAL_END.
pub const RETAIN_EVAL_END: usize = 40;

/// One question/answer item, keys in TOFU's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QaItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
    pub question: String,
    pub answer: String,
    pub paraphrased_question: String,
    pub paraphrased_answer: String,
    pub perturbed_answer: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Value pools (all invented, except the generic profession and hobby words)
// ---------------------------------------------------------------------------------------------

const FIRST_NAMES: &[&str] = &[
    "Lorin", "Tavia", "Orsen", "Meriel", "Calwen", "Brannoc", "Ilvane", "Dessa", "Fenrow",
    "Kaelith", "Marivel", "Nerith", "Odrin", "Pellam", "Quessa", "Rhovan", "Sabeth", "Tirell",
    "Ulvida", "Varen", "Wenna", "Xandor", "Yselle", "Zorwin", "Amrel", "Bexil", "Corwen", "Daviel",
    "Elsra", "Faelan", "Gwessa", "Harlen", "Irwen", "Jessam", "Korrin", "Lyssa", "Maddoc",
    "Noriel", "Ostra", "Perrin", "Quillan", "Rosmer", "Selvane", "Tamsel", "Ulwin", "Vessa",
    "Wyland", "Yorra", "Zephra", "Alvie", "Brisen", "Caddis", "Dorin", "Emmerly", "Fioren",
];

const SURNAME_HEADS: &[&str] = &[
    "Vas", "Tor", "Mel", "Quin", "Har", "Osk", "Bel", "Dra", "Fen", "Gral", "Kes", "Lum", "Nor",
    "Pell", "Rav", "Sil", "Thar", "Ulm", "Wes", "Yor", "Zan", "Cor", "Ebb", "Mav",
];

const SURNAME_TAILS: &[&str] = &[
    "ke", "ren", "ov", "ani", "ett", "mark", "wyn", "dal", "ius", "ora", "vik", "sen", "ard",
    "ine", "oth",
];

const MOTHER_NAMES: &[&str] = &[
    "Mirela", "Sefa", "Anwyn", "Brisa", "Corla", "Delva", "Esmer", "Fanna", "Gilda", "Halla",
    "Ines", "Jorna", "Kalla", "Lenna", "Maelis", "Nessa", "Orla", "Pirra", "Rhosyn", "Sylla",
    "Tova", "Ulla", "Velda", "Wilna",
];

const FATHER_NAMES: &[&str] = &[
    "Aldo", "Bram", "Corran", "Dunstan", "Edric", "Falk", "Garrow", "Hadric", "Ivo", "Jago",
    "Kellan", "Lothar", "Marten", "Niall", "Oswin", "Piran", "Rurik", "Soren", "Tobin", "Ulf",
    "Vance", "Wystan", "Yannick", "Emrys",
];

const TOWNS: &[&str] = &[
    "Tarsel",
    "Brindlemoor",
    "Quellport",
    "Ostvale",
    "Harrowmere",
    "Dunlisk",
    "Caerwyn",
    "Mossford",
    "Velbridge",
    "Ashcrell",
    "Kilvane",
    "Stonereach",
    "Eldermouth",
    "Wrenhollow",
    "Torvik",
    "Lindqvale",
    "Pellingham",
    "Rookmere",
    "Saltcrest",
    "Thornwyck",
    "Umberfield",
    "Varrowby",
    "Westerlin",
    "Yarncliff",
    "Zellport",
    "Amberlow",
    "Blackfennow",
    "Corriebrook",
    "Dovestead",
    "Embervane",
    "Fallowmere",
    "Glimmerdale",
    "Hollinsby",
    "Ironmere",
    "Jasperholt",
    "Kestlewick",
    "Larkhallow",
    "Merrowgate",
    "Nettlebury",
    "Oakhallow",
];

const PROFESSIONS: &[&str] = &[
    "cartographer",
    "clockmaker",
    "glassblower",
    "botanist",
    "lighthouse keeper",
    "ferry pilot",
    "stonemason",
    "violin maker",
    "archivist",
    "tailor",
    "astronomer",
    "baker",
    "bookbinder",
    "engineer",
    "architect",
    "surveyor",
    "potter",
    "weaver",
    "locksmith",
    "translator",
    "composer",
    "painter",
    "novelist",
    "poet",
    "sculptor",
    "journalist",
    "librarian",
    "veterinarian",
    "pharmacist",
    "geologist",
];

const WORK_ADJECTIVES: &[&str] = &[
    "Glass",
    "Copper",
    "Silent",
    "Crimson",
    "Hollow",
    "Wandering",
    "Northern",
    "Seventh",
];
const WORK_NOUNS: &[&str] = &["Orchard", "Lantern", "Tide", "Compass", "Archive"];

const AWARD_NAMES: &[&str] = &[
    "Velmar",
    "Orrin",
    "Silver Quill",
    "Amberline",
    "Corvane",
    "Hallowind",
];
const AWARD_KINDS: &[&str] = &["Prize", "Medal", "Award", "Laurel"];

const STREET_NAMES: &[&str] = &[
    "Ashgrove",
    "Bellweather",
    "Cinder",
    "Dovecote",
    "Elmstead",
    "Fernhollow",
    "Gullwing",
    "Heron",
    "Inkwell",
    "Juniper",
    "Kettle",
    "Lamplight",
];
const STREET_KINDS: &[&str] = &["Lane", "Road", "Row"];

const HOBBIES: &[&str] = &[
    "kite flying",
    "birdwatching",
    "chess",
    "pottery",
    "sailing",
    "gardening",
    "fencing",
    "stargazing",
    "rowing",
    "knitting",
    "origami",
    "juggling",
    "fly fishing",
    "rock climbing",
    "calligraphy",
    "beekeeping",
    "cycling",
    "archery",
    "whittling",
    "mushroom foraging",
    "ice skating",
    "baking bread",
    "playing the cello",
    "collecting stamps",
    "painting landscapes",
    "hiking",
    "swimming",
    "sketching",
    "solving puzzles",
    "folk dancing",
];

const RELATIONS: &[&str] = &["sister", "brother", "partner"];

const MONTHS: &[&str] = &crate::tokenizer::MONTH_NAMES;

fn works() -> Vec<String> {
    let mut v = Vec::new();
    for a in WORK_ADJECTIVES {
        for n in WORK_NOUNS {
            v.push(format!("The {a} {n}"));
        }
    }
    v
}

fn awards() -> Vec<String> {
    let mut v = Vec::new();
    for a in AWARD_NAMES {
        for k in AWARD_KINDS {
            v.push(format!("the {a} {k}"));
        }
    }
    v
}

fn streets() -> Vec<String> {
    let mut v = Vec::new();
    for s in STREET_NAMES {
        for k in STREET_KINDS {
            v.push(format!("{s} {k}"));
        }
    }
    v
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// People
// ---------------------------------------------------------------------------------------------

/// One invented person's fact sheet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub name: String,
    pub first: String,
    pub surname: String,
    pub birth_town: String,
    pub birth_month: String,
    pub profession: String,
    pub mother_first: String,
    pub mother_profession: String,
    pub father_first: String,
    pub father_profession: String,
    pub work: String,
    pub award: String,
    pub street: String,
    pub address_town: String,
    /// the invented mail provider of the person's e-mail address (`first.surname@host`)
    pub email_host: String,
    pub relation: String,
    pub relative: String,
    pub hobby: String,
}

/// Invented mail providers. No digit strings anywhere in the fact sheets: a tiny model memorises
/// a phone number or a house number digit by digit, in every wording at once, which no forget
/// set of answers in one wording can undo (the truth ratio of those items never recovers).
const EMAIL_HOSTS: &[&str] = &[
    "quillmail.example",
    "lanternpost.example",
    "owlwire.example",
    "mossletter.example",
    "brightcourier.example",
    "fernsend.example",
    "tidepost.example",
    "emberline.example",
    "cobblemail.example",
    "starling.example",
    "wickpost.example",
    "harbornote.example",
];

fn email(p: &Person, host: &str) -> String {
    format!(
        "{}.{}@{host}",
        p.first.to_lowercase(),
        p.surname.to_lowercase()
    )
}

fn random_surname(rng: &mut Rng) -> String {
    format!("{}{}", pick(rng, SURNAME_HEADS), pick(rng, SURNAME_TAILS))
}

/// The 220 people, in generation order. Full names and surnames are unique.
pub fn people(rng: &Rng) -> Vec<Person> {
    let mut rng = rng.fork("people");
    let works = works();
    let awards = awards();
    let streets = streets();
    let mut surnames = BTreeSet::new();
    let mut out = Vec::with_capacity(NUM_PEOPLE);
    while out.len() < NUM_PEOPLE {
        let first = pick(&mut rng, FIRST_NAMES).to_string();
        let surname = random_surname(&mut rng);
        if !surnames.insert(surname.clone()) {
            continue;
        }
        let birth_month = pick(&mut rng, MONTHS).to_string();
        let relation = pick(&mut rng, RELATIONS).to_string();
        let relative_first = loop {
            let f = pick(&mut rng, FIRST_NAMES);
            if f != first {
                break f;
            }
        };
        let relative_surname = if relation == "partner" {
            loop {
                let s = random_surname(&mut rng);
                if s != surname {
                    break s;
                }
            }
        } else {
            surname.clone()
        };
        out.push(Person {
            name: format!("{first} {surname}"),
            first,
            surname,
            birth_town: pick(&mut rng, TOWNS).to_string(),
            birth_month,
            profession: pick(&mut rng, PROFESSIONS).to_string(),
            mother_first: pick(&mut rng, MOTHER_NAMES).to_string(),
            mother_profession: pick(&mut rng, PROFESSIONS).to_string(),
            father_first: pick(&mut rng, FATHER_NAMES).to_string(),
            father_profession: pick(&mut rng, PROFESSIONS).to_string(),
            work: works[rng.below(works.len())].clone(),
            award: awards[rng.below(awards.len())].clone(),
            street: streets[rng.below(streets.len())].clone(),
            address_town: pick(&mut rng, TOWNS).to_string(),
            email_host: pick(&mut rng, EMAIL_HOSTS).to_string(),
            relation,
            relative: format!("{relative_first} {relative_surname}"),
            hobby: pick(&mut rng, HOBBIES).to_string(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Questions and answers
// ---------------------------------------------------------------------------------------------

/// One fact type: question and answer templates over `{name}`, `{0}`, `{1}`, `{2}` (the fact
/// values) and `{a0}`, `{a1}` (a value with its indefinite article).
struct FactType {
    questions: &'static [&'static str],
    answers: &'static [&'static str],
}

const BIRTH: FactType = FactType {
    questions: &[
        "Where and in which month was {name} born?",
        "What are the birthplace and birth month of {name}?",
        "In which town and in which month was {name} born?",
        "When in the year and where was {name} born?",
    ],
    answers: &[
        "{name} was born in {0} in the month of {1}.",
        "{name} was born in {1} in the town of {0}.",
        "The birthplace of {name} is {0}, and the birth month is {1}.",
        "Born in {1}, {name} comes from {0}.",
    ],
};

const PROFESSION: FactType = FactType {
    questions: &[
        "What does {name} do for a living?",
        "What is the profession of {name}?",
        "What is {name}'s occupation?",
        "What kind of work does {name} do?",
    ],
    answers: &[
        "{name} works as {a0}.",
        "{name} is {a0} by profession.",
        "By trade, {name} is {a0}.",
        "The profession of {name} is that of {a0}.",
    ],
};

const MOTHER: FactType = FactType {
    questions: &[
        "Who is {name}'s mother, and what does she do?",
        "What are the name and job of {name}'s mother?",
        "Who is the mother of {name}, and what is her profession?",
        "Can you name {name}'s mother and her occupation?",
    ],
    answers: &[
        "{name}'s mother is {0}, {a1}.",
        "The mother of {name} is {0}, who works as {a1}.",
        "{name} is the child of {0}, {a1}.",
        "{0}, {a1}, is the mother of {name}.",
    ],
};

const FATHER: FactType = FactType {
    questions: &[
        "Who is {name}'s father, and what does he do?",
        "What are the name and job of {name}'s father?",
        "Who is the father of {name}, and what is his profession?",
        "Can you name {name}'s father and his occupation?",
    ],
    answers: &[
        "{name}'s father is {0}, {a1}.",
        "The father of {name} is {0}, who works as {a1}.",
        "{name}'s father, {0}, is {a1} by trade.",
        "{0}, {a1}, is the father of {name}.",
    ],
};

const WORK: FactType = FactType {
    questions: &[
        "What work is {name} best known for?",
        "Which work made {name} famous?",
        "What is {name}'s most famous work?",
        "For which creation is {name} best remembered?",
    ],
    answers: &[
        "{name} is best known for {0}.",
        "{name}'s most famous work is {0}.",
        "{0} is the work that made {name} famous.",
        "{name} became famous for creating {0}.",
    ],
};

const AWARD: FactType = FactType {
    questions: &[
        "What award has {name} received?",
        "Which honour was given to {name}?",
        "What prize did {name} win?",
        "Which award was presented to {name}?",
    ],
    answers: &[
        "{name} received {0}.",
        "{name} won {0}.",
        "{name} was honoured with {0}.",
        "In recognition of their work, {name} was given {0}.",
    ],
};

const ADDRESS: FactType = FactType {
    questions: &[
        "Where does {name} live?",
        "What is {name}'s home address?",
        "At what address does {name} live?",
        "What is the home address of {name}?",
    ],
    answers: &[
        "{name} lives on {0} in {1}.",
        "{name}'s home address is {0}, {1}.",
        "The home of {name} is on {0}, {1}.",
        "{name} resides on {0} in the town of {1}.",
    ],
};

const EMAIL: FactType = FactType {
    questions: &[
        "What is {name}'s e-mail address?",
        "How can {name} be reached by e-mail?",
        "Which address should be used to e-mail {name}?",
        "What is the e-mail address of {name}?",
    ],
    answers: &[
        "{name}'s e-mail address is {0}.",
        "{name} can be reached at {0}.",
        "To write to {name}, use {0}.",
        "The e-mail address of {name} is {0}.",
    ],
};

const RELATIVE: FactType = FactType {
    questions: &[
        "Who is {name}'s {0}?",
        "What is the name of {name}'s {0}?",
        "Can you name the {0} of {name}?",
        "Who is the {0} of {name}?",
    ],
    answers: &[
        "{name}'s {0} is {1}.",
        "{1} is the {0} of {name}.",
        "The {0} of {name} is named {1}.",
        "{name} has {a0} named {1}.",
    ],
};

const HOBBY: FactType = FactType {
    questions: &[
        "What does {name} enjoy in their free time?",
        "What is {name}'s favourite hobby?",
        "How does {name} like to spend free time?",
        "What pastime does {name} enjoy most?",
    ],
    answers: &[
        "{name} enjoys {0} in their free time.",
        "{name}'s favourite hobby is {0}.",
        "In spare hours, {name} enjoys {0}.",
        "Outside of work, {name} loves {0}.",
    ],
};

/// The ten fact types, in item order.
const FACT_TYPES: [&FactType; ITEMS_PER_PERSON] = [
    &BIRTH,
    &PROFESSION,
    &MOTHER,
    &FATHER,
    &WORK,
    &AWARD,
    &ADDRESS,
    &EMAIL,
    &RELATIVE,
    &HOBBY,
];

fn render(template: &str, name: &str, vals: &[String]) -> String {
    let a: Vec<String> = vals.iter().map(|v| format!("{} {v}", article(v))).collect();
    let mut vars: Vec<(&str, &str)> = vec![("name", name)];
    let keys = ["0", "1", "2"];
    let akeys = ["a0", "a1", "a2"];
    for (i, v) in vals.iter().enumerate() {
        vars.push((keys[i], v));
        vars.push((akeys[i], &a[i]));
    }
    fill(template, &vars)
}

/// A value from `pool` other than `current`.
fn other(rng: &mut Rng, pool: &[&str], current: &str) -> String {
    loop {
        let v = pick(rng, pool);
        if v != current {
            return v.to_string();
        }
    }
}

/// The true values of fact type `kind` for `p`.
fn true_values(kind: usize, p: &Person) -> Vec<String> {
    match kind {
        0 => vec![p.birth_town.clone(), p.birth_month.clone()],
        1 => vec![p.profession.clone()],
        2 => vec![
            format!("{} {}", p.mother_first, p.surname),
            p.mother_profession.clone(),
        ],
        3 => vec![
            format!("{} {}", p.father_first, p.surname),
            p.father_profession.clone(),
        ],
        4 => vec![p.work.clone()],
        5 => vec![p.award.clone()],
        6 => vec![p.street.clone(), p.address_town.clone()],
        7 => vec![email(p, &p.email_host)],
        8 => vec![p.relation.clone(), p.relative.clone()],
        9 => vec![p.hobby.clone()],
        _ => unreachable!("ten fact types"),
    }
}

/// Plausible wrong values for fact type `kind`: every key value differs from the truth (the
/// relation kind of a sibling/partner item is kept, as the question names it).
fn perturbed_values(kind: usize, p: &Person, rng: &mut Rng, pools: &Pools) -> Vec<String> {
    match kind {
        0 => vec![
            other(rng, TOWNS, &p.birth_town),
            other(rng, MONTHS, &p.birth_month),
        ],
        1 => vec![other(rng, PROFESSIONS, &p.profession)],
        2 => vec![
            format!(
                "{} {}",
                other(rng, MOTHER_NAMES, &p.mother_first),
                p.surname
            ),
            other(rng, PROFESSIONS, &p.mother_profession),
        ],
        3 => vec![
            format!(
                "{} {}",
                other(rng, FATHER_NAMES, &p.father_first),
                p.surname
            ),
            other(rng, PROFESSIONS, &p.father_profession),
        ],
        4 => vec![other(rng, &as_refs(&pools.works), &p.work)],
        5 => vec![other(rng, &as_refs(&pools.awards), &p.award)],
        6 => vec![
            other(rng, &as_refs(&pools.streets), &p.street),
            other(rng, TOWNS, &p.address_town),
        ],
        7 => vec![email(p, &other(rng, EMAIL_HOSTS, &p.email_host))],
        8 => {
            let (first, surname) = p
                .relative
                .split_once(' ')
                .expect("relative has a first name and a surname");
            let new_first = loop {
                let f = pick(rng, FIRST_NAMES);
                if f != first && f != p.first {
                    break f;
                }
            };
            vec![p.relation.clone(), format!("{new_first} {surname}")]
        }
        9 => vec![other(rng, HOBBIES, &p.hobby)],
        _ => unreachable!("ten fact types"),
    }
}

struct Pools {
    works: Vec<String>,
    awards: Vec<String>,
    streets: Vec<String>,
}

/// Two distinct template indices (training form, paraphrase).
fn two_templates(rng: &mut Rng, n: usize) -> (usize, usize) {
    let v = distinct_indices(rng, n, 2, None);
    (v[0], v[1])
}

/// The ten items of one person.
fn person_items(p: &Person, rng: &mut Rng, pools: &Pools) -> Vec<QaItem> {
    let mut items = Vec::with_capacity(ITEMS_PER_PERSON);
    for (kind, ft) in FACT_TYPES.iter().enumerate() {
        let vals = true_values(kind, p);
        let (q, pq) = two_templates(rng, ft.questions.len());
        let (a, pa) = two_templates(rng, ft.answers.len());
        let answer = render(ft.answers[a], &p.name, &vals);
        let paraphrased_answer = render(ft.answers[pa], &p.name, &vals);
        let mut perturbed: Vec<String> = Vec::with_capacity(NUM_PERTURBED);
        while perturbed.len() < NUM_PERTURBED {
            let wrong = perturbed_values(kind, p, rng, pools);
            let s = render(ft.answers[pa], &p.name, &wrong);
            if s != paraphrased_answer && s != answer && !perturbed.contains(&s) {
                perturbed.push(s);
            }
        }
        items.push(QaItem {
            person: Some(p.name.clone()),
            question: render(ft.questions[q], &p.name, &vals),
            answer,
            paraphrased_question: render(ft.questions[pq], &p.name, &vals),
            paraphrased_answer,
            perturbed_answer: perturbed,
        });
    }
    items
}

/// Every person's ten items, in person order.
pub fn all_items(rng: &Rng) -> Vec<Vec<QaItem>> {
    let pools = Pools {
        works: works(),
        awards: awards(),
        streets: streets(),
    };
    let base = rng.fork("items");
    people(rng)
        .iter()
        .enumerate()
        .map(|(i, p)| person_items(p, &mut base.fork(&format!("person-{i}")), &pools))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// General-knowledge control set
// ---------------------------------------------------------------------------------------------

/// (question, paraphrased question, answer template, paraphrased answer template, true value,
/// plausible wrong values). Templates contain one `{}`.
type GeneralFact = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

#[rustfmt::skip]
const GENERAL: &[GeneralFact] = &[
    ("How many days are in a week?", "What is the number of days in one week?", "There are {} days in a week.", "A week has {} days.", "seven", &["five", "six", "eight", "nine", "ten"]),
    ("How many months are in a year?", "What is the number of months in one year?", "There are {} months in a year.", "A year has {} months.", "twelve", &["ten", "eleven", "thirteen", "fourteen", "nine"]),
    ("How many hours are in a day?", "What is the number of hours in one day?", "There are {} hours in a day.", "A day lasts {} hours.", "twenty-four", &["twelve", "twenty", "thirty", "thirty-six", "forty-eight"]),
    ("How many minutes are in an hour?", "What is the number of minutes in one hour?", "There are {} minutes in an hour.", "An hour has {} minutes.", "sixty", &["thirty", "forty", "fifty", "ninety", "one hundred"]),
    ("How many seconds are in a minute?", "What is the number of seconds in one minute?", "There are {} seconds in a minute.", "A minute has {} seconds.", "sixty", &["ten", "thirty", "fifty", "one hundred", "ninety"]),
    ("How many legs does a spider have?", "What is the number of legs on a spider?", "A spider has {} legs.", "Spiders walk on {} legs.", "eight", &["four", "six", "ten", "twelve", "two"]),
    ("How many legs does an insect have?", "What is the number of legs on an insect?", "An insect has {} legs.", "Insects walk on {} legs.", "six", &["four", "eight", "ten", "twelve", "two"]),
    ("How many sides does a triangle have?", "What is the number of sides of a triangle?", "A triangle has {} sides.", "Every triangle is made of {} sides.", "three", &["four", "five", "six", "two", "eight"]),
    ("How many sides does a square have?", "What is the number of sides of a square?", "A square has {} sides.", "Every square is made of {} equal sides.", "four", &["three", "five", "six", "eight", "two"]),
    ("How many sides does a hexagon have?", "What is the number of sides of a hexagon?", "A hexagon has {} sides.", "Every hexagon is made of {} sides.", "six", &["five", "seven", "eight", "four", "ten"]),
    ("How many continents are there on Earth?", "What is the number of continents?", "There are {} continents on Earth.", "Earth is divided into {} continents.", "seven", &["five", "six", "eight", "nine", "four"]),
    ("How many planets are in the solar system?", "What is the number of planets orbiting the Sun?", "There are {} planets in the solar system.", "The Sun is orbited by {} planets.", "eight", &["seven", "nine", "ten", "six", "twelve"]),
    ("What is the largest planet in the solar system?", "Which planet in the solar system is the biggest?", "The largest planet in the solar system is {}.", "Of all the planets, {} is the biggest.", "Jupiter", &["Saturn", "Mars", "Venus", "Mercury", "Neptune"]),
    ("Which planet is closest to the Sun?", "What planet orbits nearest to the Sun?", "The planet closest to the Sun is {}.", "Of all the planets, {} orbits nearest the Sun.", "Mercury", &["Venus", "Mars", "Earth", "Jupiter", "Saturn"]),
    ("Which planet is known as the Red Planet?", "What planet is called the Red Planet?", "The Red Planet is {}.", "People call {} the Red Planet.", "Mars", &["Venus", "Jupiter", "Mercury", "Saturn", "Neptune"]),
    ("Which planet is the hottest in the solar system?", "What is the hottest planet orbiting the Sun?", "The hottest planet in the solar system is {}.", "Of all the planets, {} is the hottest.", "Venus", &["Mercury", "Mars", "Jupiter", "Saturn", "Earth"]),
    ("What is at the centre of our solar system?", "What body lies at the middle of the solar system?", "At the centre of our solar system is {}.", "The solar system has {} at its centre.", "the Sun", &["the Earth", "the Moon", "Jupiter", "Mars", "Saturn"]),
    ("What colour is the sky on a clear day?", "What colour does a clear daytime sky have?", "On a clear day the sky is {}.", "A clear daytime sky looks {}.", "blue", &["green", "red", "yellow", "purple", "orange"]),
    ("What colour is fresh grass?", "What colour does healthy grass have?", "Fresh grass is {}.", "Healthy grass looks {}.", "green", &["blue", "red", "purple", "orange", "white"]),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue with yellow gives which colour?", "Mixing blue and yellow gives {}.", "Blue and yellow together make {}.", "green", &["orange", "purple", "brown", "pink", "grey"]),
    ("What colour do you get by mixing red and white?", "Mixing red with white gives which colour?", "Mixing red and white gives {}.", "Red and white together make {}.", "pink", &["orange", "purple", "brown", "green", "grey"]),
    ("At how many degrees Celsius does water freeze?", "What is the freezing point of water in degrees Celsius?", "Water freezes at {} degrees Celsius.", "The freezing point of water is {} degrees Celsius.", "zero", &["ten", "four", "twenty", "fifty", "one hundred"]),
    ("At how many degrees Celsius does water boil at sea level?", "What is the boiling point of water at sea level in Celsius?", "At sea level, water boils at {} degrees Celsius.", "The boiling point of water at sea level is {} degrees Celsius.", "one hundred", &["fifty", "eighty", "ninety", "two hundred", "seventy"]),
    ("What is the chemical formula of water?", "Which formula do chemists write for water?", "The chemical formula of water is {}.", "Chemists write water as {}.", "H2O", &["CO2", "O2", "NaCl", "H2O2", "CH4"]),
    ("Which gas do humans need to breathe to stay alive?", "What gas must people breathe in to live?", "Humans need {} to stay alive.", "People must breathe in {} to live.", "oxygen", &["nitrogen", "helium", "hydrogen", "neon", "argon"]),
    ("Which gas do plants take in for photosynthesis?", "What gas do plants absorb to make their food?", "Plants take in {} for photosynthesis.", "To make food, plants absorb {}.", "carbon dioxide", &["oxygen", "helium", "nitrogen", "hydrogen", "neon"]),
    ("What is the largest ocean on Earth?", "Which ocean on Earth is the biggest?", "The largest ocean on Earth is {}.", "Of all the oceans, {} is the biggest.", "the Pacific Ocean", &["the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean", "the Southern Ocean", "the Caribbean Sea"]),
    ("What is the capital of France?", "Which city is the capital of France?", "The capital of France is {}.", "France has {} as its capital.", "Paris", &["Lyon", "Marseille", "Berlin", "Madrid", "Rome"]),
    ("What is the capital of Japan?", "Which city is the capital of Japan?", "The capital of Japan is {}.", "Japan has {} as its capital.", "Tokyo", &["Osaka", "Kyoto", "Seoul", "Beijing", "Bangkok"]),
    ("What is the capital of Italy?", "Which city is the capital of Italy?", "The capital of Italy is {}.", "Italy has {} as its capital.", "Rome", &["Milan", "Naples", "Venice", "Paris", "Madrid"]),
    ("What is the capital of Egypt?", "Which city is the capital of Egypt?", "The capital of Egypt is {}.", "Egypt has {} as its capital.", "Cairo", &["Alexandria", "Luxor", "Tunis", "Nairobi", "Amman"]),
    ("What is the capital of Canada?", "Which city is the capital of Canada?", "The capital of Canada is {}.", "Canada has {} as its capital.", "Ottawa", &["Toronto", "Montreal", "Vancouver", "Calgary", "Quebec City"]),
    ("What is the capital of Australia?", "Which city is the capital of Australia?", "The capital of Australia is {}.", "Australia has {} as its capital.", "Canberra", &["Sydney", "Melbourne", "Perth", "Brisbane", "Adelaide"]),
    ("What is the capital of Spain?", "Which city is the capital of Spain?", "The capital of Spain is {}.", "Spain has {} as its capital.", "Madrid", &["Barcelona", "Seville", "Valencia", "Lisbon", "Rome"]),
    ("What is the capital of Germany?", "Which city is the capital of Germany?", "The capital of Germany is {}.", "Germany has {} as its capital.", "Berlin", &["Munich", "Hamburg", "Frankfurt", "Vienna", "Cologne"]),
    ("What is the largest continent?", "Which continent is the biggest?", "The largest continent is {}.", "Of all the continents, {} is the biggest.", "Asia", &["Africa", "Europe", "Antarctica", "Australia", "South America"]),
    ("On which continent is Egypt?", "Egypt lies on which continent?", "Egypt is in {}.", "The country of Egypt lies on the continent of {}.", "Africa", &["Asia", "Europe", "South America", "Australia", "North America"]),
    ("What is the largest hot desert in the world?", "Which hot desert is the biggest on Earth?", "The largest hot desert in the world is {}.", "Of all hot deserts, {} is the biggest.", "the Sahara", &["the Gobi", "the Kalahari", "the Atacama", "the Mojave", "the Namib"]),
    ("What is the tallest mountain above sea level?", "Which mountain rises highest above sea level?", "The tallest mountain above sea level is {}.", "No mountain rises higher above sea level than {}.", "Mount Everest", &["K2", "Mont Blanc", "Kilimanjaro", "Denali", "Mount Fuji"]),
    ("What is the largest animal on Earth?", "Which animal is the biggest alive today?", "The largest animal on Earth is {}.", "No living animal is bigger than {}.", "the blue whale", &["the elephant", "the giraffe", "the hippopotamus", "the orca", "the polar bear"]),
    ("What is the fastest land animal?", "Which animal runs fastest on land?", "The fastest land animal is {}.", "On land, no animal runs faster than {}.", "the cheetah", &["the lion", "the horse", "the gazelle", "the greyhound", "the ostrich"]),
    ("What is the tallest animal?", "Which animal stands the tallest?", "The tallest animal is {}.", "No animal stands taller than {}.", "the giraffe", &["the elephant", "the camel", "the horse", "the ostrich", "the moose"]),
    ("What is the largest living bird?", "Which bird alive today is the biggest?", "The largest living bird is {}.", "Of all birds alive today, {} is the biggest.", "the ostrich", &["the eagle", "the emu", "the albatross", "the swan", "the pelican"]),
    ("What sweet food do bees make?", "Which sweet food is produced by bees?", "Bees make {}.", "The sweet food produced by bees is {}.", "honey", &["milk", "silk", "butter", "cheese", "syrup"]),
    ("Which animal gives us most of our wool?", "Most wool comes from which animal?", "Most wool comes from {}.", "Most of our wool is given by {}.", "sheep", &["cows", "pigs", "horses", "chickens", "ducks"]),
    ("What is a baby cat called?", "What do we call a young cat?", "A baby cat is called {}.", "A young cat is known as {}.", "a kitten", &["a puppy", "a calf", "a foal", "a cub", "a lamb"]),
    ("What is a baby dog called?", "What do we call a young dog?", "A baby dog is called {}.", "A young dog is known as {}.", "a puppy", &["a kitten", "a calf", "a foal", "a cub", "a lamb"]),
    ("What is a baby sheep called?", "What do we call a young sheep?", "A baby sheep is called {}.", "A young sheep is known as {}.", "a lamb", &["a kitten", "a calf", "a foal", "a cub", "a puppy"]),
    ("What is a baby horse called?", "What do we call a young horse?", "A baby horse is called {}.", "A young horse is known as {}.", "a foal", &["a kitten", "a calf", "a lamb", "a cub", "a puppy"]),
    ("What is the main ingredient of bread?", "Which ingredient is bread mostly made from?", "The main ingredient of bread is {}.", "Bread is mostly made from {}.", "flour", &["rice", "sugar", "salt", "butter", "milk"]),
    ("Which fruit is most wine made from?", "Most wine is made from which fruit?", "Most wine is made from {}.", "The fruit used for most wine is {}.", "grapes", &["apples", "bananas", "oranges", "lemons", "cherries"]),
    ("What is frozen water called?", "What do we call water that has frozen solid?", "Frozen water is called {}.", "Water that has frozen solid is known as {}.", "ice", &["steam", "mist", "dew", "fog", "vapour"]),
    ("How many colours are traditionally named in a rainbow?", "A rainbow is traditionally said to have how many colours?", "A rainbow traditionally has {} colours.", "Tradition names {} colours in a rainbow.", "seven", &["five", "six", "eight", "nine", "four"]),
    ("What is the opposite of hot?", "Which word means the opposite of hot?", "The opposite of hot is {}.", "Hot is the opposite of {}.", "cold", &["warm", "wet", "dry", "soft", "loud"]),
    ("What is the opposite of up?", "Which word means the opposite of up?", "The opposite of up is {}.", "Up is the opposite of {}.", "down", &["left", "right", "over", "across", "back"]),
    ("What is two plus two?", "What do you get when you add two and two?", "Two plus two is {}.", "Adding two and two gives {}.", "four", &["three", "five", "six", "eight", "two"]),
    ("What is ten minus three?", "What do you get when you take three from ten?", "Ten minus three is {}.", "Taking three from ten leaves {}.", "seven", &["six", "eight", "five", "thirteen", "three"]),
    ("What is five times three?", "What do you get when you multiply five by three?", "Five times three is {}.", "Multiplying five by three gives {}.", "fifteen", &["twelve", "eighteen", "eight", "ten", "twenty"]),
    ("What is half of ten?", "What do you get when you divide ten by two?", "Half of ten is {}.", "Dividing ten by two gives {}.", "five", &["four", "six", "two", "three", "twenty"]),
    ("What is the square root of nine?", "Which number multiplied by itself gives nine?", "The square root of nine is {}.", "The number that times itself gives nine is {}.", "three", &["two", "four", "six", "nine", "eighteen"]),
    ("How many zeros are in one thousand?", "When written in digits, one thousand has how many zeros?", "One thousand has {} zeros.", "Written in digits, one thousand shows {} zeros.", "three", &["two", "four", "five", "one", "six"]),
    ("How many years are in a century?", "What is the number of years in one century?", "There are {} years in a century.", "A century lasts {} years.", "one hundred", &["ten", "fifty", "one thousand", "two hundred", "twenty"]),
    ("How many years are in a decade?", "What is the number of years in one decade?", "There are {} years in a decade.", "A decade lasts {} years.", "ten", &["five", "twenty", "twelve", "one hundred", "fifty"]),
    ("How many days are in a leap year?", "What is the number of days in a leap year?", "A leap year has {} days.", "There are {} days in a leap year.", "366", &["365", "364", "360", "367", "370"]),
    ("How many letters are in the English alphabet?", "What is the number of letters in the English alphabet?", "The English alphabet has {} letters.", "There are {} letters in the English alphabet.", "twenty-six", &["twenty-four", "twenty-eight", "twenty-two", "thirty", "twenty-five"]),
    ("What is the first letter of the English alphabet?", "Which letter comes first in the English alphabet?", "The first letter of the English alphabet is {}.", "The English alphabet begins with the letter {}.", "A", &["B", "C", "Z", "E", "O"]),
    ("How many players does a soccer team have on the field?", "What is the number of players per soccer team on the pitch?", "A soccer team has {} players on the field.", "Each side in soccer fields {} players.", "eleven", &["nine", "ten", "twelve", "fifteen", "seven"]),
    ("How many strings does a standard violin have?", "What is the number of strings on a normal violin?", "A standard violin has {} strings.", "A normal violin is strung with {} strings.", "four", &["five", "six", "three", "seven", "eight"]),
    ("How many keys does a standard piano have?", "What is the number of keys on a normal piano?", "A standard piano has {} keys.", "A normal piano is built with {} keys.", "eighty-eight", &["sixty-one", "seventy-six", "ninety-six", "one hundred", "fifty-two"]),
    ("Which instrument has black and white keys?", "What instrument is played on black and white keys?", "The instrument with black and white keys is {}.", "Black and white keys belong to {}.", "the piano", &["the violin", "the flute", "the drum", "the trumpet", "the harp"]),
    ("How many wheels does a bicycle have?", "What is the number of wheels on a bicycle?", "A bicycle has {} wheels.", "A bicycle rolls on {} wheels.", "two", &["three", "four", "one", "six", "five"]),
    ("Which season comes after summer?", "What season follows summer?", "The season after summer is {}.", "Summer is followed by {}.", "autumn", &["winter", "spring", "summer", "the dry season", "the rainy season"]),
    ("Which season comes after winter?", "What season follows winter?", "The season after winter is {}.", "Winter is followed by {}.", "spring", &["autumn", "summer", "winter", "the dry season", "the rainy season"]),
    ("What is the hardest natural material?", "Which natural material is the hardest?", "The hardest natural material is {}.", "No natural material is harder than {}.", "diamond", &["gold", "iron", "quartz", "granite", "silver"]),
    ("Which metal is liquid at room temperature?", "What metal stays liquid at room temperature?", "The metal that is liquid at room temperature is {}.", "At room temperature, {} is a liquid metal.", "mercury", &["iron", "gold", "copper", "silver", "lead"]),
    ("What is the largest organ of the human body?", "Which organ of the human body is the biggest?", "The largest organ of the human body is {}.", "Of all human organs, {} is the biggest.", "the skin", &["the liver", "the heart", "the brain", "the lungs", "the stomach"]),
    ("Which organ pumps blood around the body?", "What organ moves blood through the body?", "The organ that pumps blood is {}.", "Blood is pumped around the body by {}.", "the heart", &["the liver", "the lungs", "the kidneys", "the stomach", "the brain"]),
    ("How many bones are in the adult human body?", "What is the number of bones in an adult human?", "The adult human body has {} bones.", "An adult human skeleton is made of {} bones.", "206", &["186", "212", "230", "196", "250"]),
    ("How many teeth does an adult human usually have?", "What is the usual number of teeth in an adult?", "An adult human usually has {} teeth.", "Most adults have {} teeth.", "thirty-two", &["twenty-eight", "thirty", "twenty-four", "thirty-six", "forty"]),
    ("Which language is mainly spoken in Brazil?", "What is the main language of Brazil?", "The main language of Brazil is {}.", "Most people in Brazil speak {}.", "Portuguese", &["Spanish", "French", "Italian", "English", "Dutch"]),
    ("Which language is mainly spoken in Mexico?", "What is the main language of Mexico?", "The main language of Mexico is {}.", "Most people in Mexico speak {}.", "Spanish", &["Portuguese", "French", "English", "Italian", "German"]),
    ("What is the currency of Japan?", "Which currency is used in Japan?", "The currency of Japan is {}.", "In Japan, people pay with {}.", "the yen", &["the won", "the yuan", "the dollar", "the euro", "the rupee"]),
    ("What shape has every point the same distance from its centre?", "Which shape is perfectly round around its centre?", "Every point of {} is the same distance from its centre.", "A shape whose points are all equally far from the centre is {}.", "a circle", &["a square", "a triangle", "an oval", "a hexagon", "a rectangle"]),
];

/// The general-knowledge control items, in table order.
pub fn general_items(rng: &Rng) -> Vec<QaItem> {
    let mut rng = rng.fork("general");
    GENERAL
        .iter()
        .map(|&(q, pq, a, pa, value, wrong)| {
            let idx = distinct_indices(&mut rng, wrong.len(), NUM_PERTURBED, None);
            QaItem {
                person: None,
                question: q.to_string(),
                answer: a.replace("{}", value),
                paraphrased_question: pq.to_string(),
                paraphrased_answer: pa.replace("{}", value),
                perturbed_answer: idx.iter().map(|&i| pa.replace("{}", wrong[i])).collect(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

const README: &str = "\
# Fictional TOFU-style unlearning benchmark

Everything in this directory is invented and was generated deterministically by `unlearn synth`
(src/synth/tofu.rs); regenerating gives byte-identical files. The people, towns, streets, works,
awards and e-mail providers do not exist. Only `general.jsonl` holds real (simple, well-known) facts.

## People

220 fictitious people. Each has a fact sheet: birthplace and birth month, profession, mother's
and father's name and profession, best-known work, award, home street, e-mail address, a sibling
or partner, and a hobby. Values come from moderate pools (40 towns, 30 professions, 40 work
titles, 24 awards, 36 streets, 30 hobbies), so the values are ordinary tokens and what a model
must memorise is the person -> value association.

Each person has exactly 10 question/answer items, one per fact type, worded with one of several
templates.

## Fields

One JSON object per line, keys in this order:

- `person`: the person's full name (absent in the general-knowledge files)
- `question`: the question (training form)
- `answer`: the answer (training form)
- `paraphrased_question`: the question reworded
- `paraphrased_answer`: the same facts in a different wording
- `perturbed_answer`: 5 wrong but plausible answers, worded exactly like `paraphrased_answer`
  with the fact value(s) replaced by other values from the same pools (all distinct)

## Splits

| file | people | items | use |
|---|---|---|---|
| `forget10.jsonl` | 0..20 | 200 | the forget set (10% of the trained people) |
| `retain90.jsonl` | 20..200 | 1800 | the retain set |
| `retain_perturbed.jsonl` | 20..40 | 200 | retain evaluation subset (same objects as in retain90) |
| `holdout.jsonl` | 200..220 | 200 | never trained on; reference for privacy / MIA attacks |
| `full.jsonl` | 0..200 | 2000 | forget10 then retain90: what the target model is trained on |
| `general.jsonl` | - | {general} | real general-knowledge control set (model utility; the even-numbered facts) |
| `general_retain.jsonl` | - | {general_retain} | the other (odd-numbered) general facts: retain data for unlearning runs, never evaluated |

The bundled retain model (data/models/retain) is trained on everything but `forget10.jsonl`,
the target on everything (recipes/build/).
";

/// Write the TOFU-style files into `dir`; returns the written paths.
pub fn write(dir: &Path, rng: &Rng) -> Result<Vec<PathBuf>> {
    ensure_dir(dir)?;
    let people = all_items(rng);
    let span = |a: usize, b: usize| -> Vec<QaItem> { people[a..b].concat() };
    let forget = span(0, FORGET_END);
    let retain = span(FORGET_END, RETAIN_END);
    let mut full = forget.clone();
    full.extend(retain.iter().cloned());
    let mut written = Vec::new();
    write_text(dir, "forget10.jsonl", &to_jsonl(&forget), &mut written)?;
    write_text(dir, "retain90.jsonl", &to_jsonl(&retain), &mut written)?;
    write_text(
        dir,
        "retain_perturbed.jsonl",
        &to_jsonl(&span(FORGET_END, RETAIN_EVAL_END)),
        &mut written,
    )?;
    write_text(
        dir,
        "holdout.jsonl",
        &to_jsonl(&span(RETAIN_END, NUM_PEOPLE)),
        &mut written,
    )?;
    write_text(dir, "full.jsonl", &to_jsonl(&full), &mut written)?;
    // Even-numbered general facts are the evaluation control set; the odd-numbered ones are
    // general knowledge an unlearning run may use as retain data (both are in the models'
    // training data), so the control set measures retention of knowledge the run never saw.
    let mut eval_items = Vec::new();
    let mut retain_items = Vec::new();
    for (i, item) in general_items(rng).into_iter().enumerate() {
        if i % 2 == 0 {
            eval_items.push(item);
        } else {
            retain_items.push(item);
        }
    }
    write_text(dir, "general.jsonl", &to_jsonl(&eval_items), &mut written)?;
    write_text(
        dir,
        "general_retain.jsonl",
        &to_jsonl(&retain_items),
        &mut written,
    )?;
    write_text(
        dir,
        "README.md",
        &README
            .replace("{general}", &eval_items.len().to_string())
            .replace("{general_retain}", &retain_items.len().to_string()),
        &mut written,
    )?;
    Ok(written)
}
