//! A deterministic generator of synthetic clinical notes with gold PHI spans, for
//! `medpipe eval deid`: progress notes, discharge summaries, radiology and lab narratives,
//! with headers, signature lines and cc lists, and names, dates and identifiers written in
//! many surface forms. Every person, place and number is invented here.
//!
//! The forms are the ones clinical notes use, not the scrubber's patterns: the point is
//! to measure the scrubber, so nothing here is tuned to what it already finds.

use crate::eval::{GoldNote, GoldSpan};

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Lisa",
    "Daniel",
    "Nancy",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Kenneth",
    "Carol",
    "Kevin",
    "Amanda",
    "Brian",
    "Dorothy",
    "George",
    "Melissa",
    "Timothy",
    "Deborah",
    "Ronald",
    "Stephanie",
    "Edward",
    "Rebecca",
    "Jason",
    "Sharon",
    "Jeffrey",
    "Laura",
    "Ryan",
    "Cynthia",
    "Jacob",
    "Kathleen",
    "Gary",
    "Amy",
    "Nicholas",
    "Angela",
    "Eric",
    "Shirley",
    "Jonathan",
    "Anna",
    "Stephen",
    "Brenda",
    "Larry",
    "Pamela",
    "Justin",
    "Emma",
    "Scott",
    "Nicole",
    "Brandon",
    "Helen",
    "Benjamin",
    "Samantha",
    "Samuel",
    "Katherine",
    "Gregory",
    "Christine",
    "Alexander",
    "Debra",
    "Frank",
    "Rachel",
    "Raymond",
    "Carolyn",
    "Jack",
    "Janet",
    "Dennis",
    "Catherine",
    "Jerry",
    "Maria",
    "Tyler",
    "Heather",
    "Aaron",
    "Diane",
    "Jose",
    "Ruth",
    "Adam",
    "Julie",
    "Nathan",
    "Olivia",
    "Henry",
    "Joyce",
    "Zachary",
    "Virginia",
    "Douglas",
    "Victoria",
    "Peter",
    "Kelly",
    "Kyle",
    "Lauren",
    "Noah",
    "Christina",
    "Ethan",
    "Joan",
    "Jeremy",
    "Evelyn",
    "Walter",
    "Judith",
    "Christian",
    "Megan",
    "Keith",
    "Andrea",
    "Roger",
    "Cheryl",
    "Terry",
    "Hannah",
    "Austin",
    "Jacqueline",
    "Sean",
    "Martha",
    "Gerald",
    "Gloria",
    "Carl",
    "Teresa",
    "Harold",
    "Ann",
    "Dylan",
    "Sara",
    "Arthur",
    "Madison",
    "Lawrence",
    "Frances",
    "Jordan",
    "Kathryn",
    "Jesse",
    "Janice",
    "Bryan",
    "Jean",
    "Billy",
    "Abigail",
    "Bruce",
    "Alice",
    "Gabriel",
    "Judy",
    "Joe",
    "Sophia",
    "Logan",
    "Grace",
    "Alan",
    "Denise",
    "Juan",
    "Amber",
    "Albert",
    "Doris",
    "Willie",
    "Marilyn",
    "Elijah",
    "Danielle",
    "Wayne",
    "Beverly",
    "Randy",
    "Isabella",
    "Vincent",
    "Theresa",
    "Mason",
    "Diana",
    "Roy",
    "Natalie",
    "Ralph",
    "Brittany",
    "Bobby",
    "Charlotte",
    "Russell",
    "Marie",
    "Bradley",
    "Kayla",
    "Philip",
    "Alexis",
    "Eugene",
    "Lori",
];

const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Gomez",
    "Phillips",
    "Evans",
    "Turner",
    "Diaz",
    "Parker",
    "Cruz",
    "Edwards",
    "Collins",
    "Reyes",
    "Stewart",
    "Morris",
    "Morales",
    "Murphy",
    "Cook",
    "Rogers",
    "Gutierrez",
    "Ortiz",
    "Morgan",
    "Cooper",
    "Peterson",
    "Bailey",
    "Reed",
    "Kelly",
    "Howard",
    "Ramos",
    "Kim",
    "Cox",
    "Ward",
    "Richardson",
    "Watson",
    "Brooks",
    "Chavez",
    "Wood",
    "James",
    "Bennett",
    "Gray",
    "Mendoza",
    "Ruiz",
    "Hughes",
    "Price",
    "Alvarez",
    "Castillo",
    "Sanders",
    "Patel",
    "Myers",
    "Long",
    "Ross",
    "Foster",
    "Jimenez",
    "Powell",
    "Jenkins",
    "Perry",
    "Russell",
    "Sullivan",
    "Bell",
    "Coleman",
    "Butler",
    "Henderson",
    "Barnes",
    "Gonzales",
    "Fisher",
    "Vasquez",
    "Simmons",
    "Romero",
    "Jordan",
    "Patterson",
    "Alexander",
    "Hamilton",
    "Graham",
    "Reynolds",
    "Griffin",
    "Wallace",
    "Moreno",
    "West",
    "Cole",
    "Hayes",
    "Bryant",
    "Herrera",
    "Gibson",
    "Ellis",
    "Tran",
    "Medina",
    "Aguilar",
    "Stevens",
    "Murray",
    "Ford",
    "Castro",
    "Marshall",
    "Owens",
    "Harrison",
    "Fernandez",
    "McDonald",
    "Woods",
    "Washington",
    "Kennedy",
    "Wells",
    "Vargas",
    "Henry",
    "Chen",
    "Freeman",
    "Webb",
    "Tucker",
    "Guzman",
    "Burns",
    "Crawford",
    "Olson",
    "Simpson",
    "Porter",
    "Hunter",
    "Gordon",
    "Mendez",
    "Silva",
    "Shaw",
    "Snyder",
    "Mason",
    "Dixon",
    "Munoz",
    "Hunt",
    "Hicks",
    "Holmes",
    "Palmer",
    "Wagner",
    "Black",
    "Robertson",
    "Boyd",
    "Rose",
    "Stone",
    "Salazar",
    "Fox",
    "Warren",
    "Mills",
    "Meyer",
    "Rice",
    "Schmidt",
    "Garza",
    "Daniels",
    "Ferguson",
    "Nichols",
    "Stephens",
    "Soto",
    "Weaver",
    "Ryan",
    "Gardner",
    "Payne",
    "Grant",
    "Dunn",
    "Kelley",
    "Spencer",
    "Hawkins",
    "Arnold",
    "Pierce",
    "Vazquez",
    "Hansen",
    "Peters",
    "Santos",
    "Hart",
    "Bradley",
    "Knight",
    "Elliott",
    "Cunningham",
    "Duncan",
    "Armstrong",
    "Hudson",
    "Carroll",
    "Lane",
    "Riley",
    "Andrews",
    "Alvarado",
    "Ray",
    "Delgado",
    "Berry",
    "Perkins",
    "Hoffman",
    "Johnston",
    "Matthews",
    "Pena",
    "Richards",
    "Contreras",
    "Willis",
    "Carpenter",
    "Lawrence",
    "Sandoval",
    "O'Brien",
    "Okafor",
    "Nakamura",
    "Kowalski",
    "Novak",
    "Haddad",
    "Osei",
];

const HOSPITALS: &[&str] = &[
    "St. Brigid Medical Center",
    "Maple Valley Hospital",
    "Riverside General Hospital",
    "Lakeview Regional Medical Center",
    "Mercy Hills Hospital",
    "Cedar Point Clinic",
    "North Shore Community Hospital",
    "Saint Aldric Hospital",
    "Granite Falls Medical Center",
];

const STREETS: &[&str] = &[
    "Main Street",
    "Oak Avenue",
    "Maple Drive",
    "Cedar Lane",
    "Elm Street",
    "Pine Road",
    "Lakeshore Blvd",
    "Hillcrest Ave",
    "Washington St",
    "Park Place",
    "River Road",
];

const CITIES: &[&str] = &[
    "Springfield",
    "Riverton",
    "Fairview",
    "Greenville",
    "Madison",
    "Clinton",
    "Georgetown",
    "Ashland",
    "Milford",
    "Oakdale",
    "Franklin",
    "Bristol",
];

const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// SplitMix64: a small deterministic generator, so a seed gives the same notes anywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|i| {
                let d = self.below(10);
                char::from(b'0' + if i == 0 { d.max(1) } else { d } as u8)
            })
            .collect()
    }
}

/// A note under construction: text, and gold spans in characters.
struct Note {
    text: String,
    chars: usize,
    spans: Vec<GoldSpan>,
}

impl Note {
    fn new() -> Note {
        Note {
            text: String::new(),
            chars: 0,
            spans: Vec::new(),
        }
    }

    fn t(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self.chars += s.chars().count();
        self
    }

    fn phi(&mut self, kind: &str, s: &str) -> &mut Self {
        let start = self.chars;
        self.t(s);
        self.spans.push(GoldSpan {
            start,
            end: self.chars,
            kind: kind.to_owned(),
        });
        self
    }

    fn done(self) -> GoldNote {
        GoldNote {
            text: self.text,
            spans: self.spans,
        }
    }
}

/// A person of the note.
struct Person {
    first: &'static str,
    last: &'static str,
    middle: char,
}

fn person(r: &mut Rng) -> Person {
    Person {
        first: r.pick(FIRST),
        last: r.pick(LAST),
        middle: char::from(b'A' + r.below(26) as u8),
    }
}

/// Writes a person's name in one of the forms notes use.
fn name(n: &mut Note, r: &mut Rng, p: &Person) {
    let s = match r.below(6) {
        0 => format!("{} {}", p.first, p.last),
        1 => format!("{}, {}", p.last, p.first),
        2 => format!("{} {}", p.first, p.last).to_uppercase(),
        3 => format!("{}, {}", p.last, p.first).to_uppercase(),
        4 => format!("{} {}. {}", p.first, p.middle, p.last),
        _ => p.last.to_owned(),
    };
    n.phi("NAME", &s);
}

/// A clinician: with a title before, or a credential after.
fn clinician(n: &mut Note, r: &mut Rng, p: &Person) {
    match r.below(6) {
        0 => n.t("Dr. ").phi("NAME", p.last),
        1 => n.t("Dr ").phi("NAME", &p.last.to_lowercase()),
        2 => n
            .phi("NAME", &format!("{} {} {}", p.first, p.middle, p.last))
            .t(", M.D."),
        3 => n.phi("NAME", &format!("{} {}", p.first, p.last)).t(", MD"),
        4 => n.phi("NAME", &format!("{} {}", p.first, p.last)).t(", RN"),
        _ => n.phi("NAME", &format!("{} {}", p.first, p.last)).t(" NP"),
    };
}

/// A date in one of the forms notes use (never a bare year: a year alone is not PHI).
fn date(n: &mut Note, r: &mut Rng) {
    let (y, m, d) = (1998 + r.below(27), 1 + r.below(12), 1 + r.below(28));
    let month = MONTHS[m - 1];
    let s = match r.below(12) {
        0 => format!("{m:02}/{d:02}/{y}"),
        1 => format!("{m}/{d}/{:02}", y % 100),
        2 => format!("{m}-{d:02}-{:02}", y % 100),
        3 => format!("{m:02}.{d:02}.{y}"),
        4 => format!("{y}-{m:02}-{d:02}"),
        5 => format!("{month} {d}, {y}"),
        6 => format!("{d} {month} {y}"),
        7 => format!("{} {d}", &month[..3]),
        8 => format!("{m}/{d}"),
        9 => format!("{m}/{:02}", y % 100),
        10 => month.to_owned(),
        _ => format!("{d}-{}-{y}", &month[..3]),
    };
    n.phi("DATE", &s);
}

/// An identifier in one of the forms notes use.
fn identifier(n: &mut Note, r: &mut Rng) {
    match r.below(8) {
        0 => n.t("MRN: ").phi("ID", &r.digits(7)),
        1 => n.t("record no. ").phi(
            "ID",
            &format!(
                "{}-{}-{}-{}",
                r.digits(3),
                r.digits(2),
                r.digits(2),
                r.digits(1)
            ),
        ),
        2 => n
            .t("ref ")
            .phi("ID", &format!("XW{}/{}", r.digits(3), r.digits(5))),
        3 => n.t("acct #").phi("ID", &r.digits(9)),
        4 => {
            let code = format!(
                "{}{}{}",
                char::from(b'A' + r.below(26) as u8),
                char::from(b'A' + r.below(26) as u8),
                r.digits(2)
            );
            n.t("entered by ").phi("ID", &code)
        }
        5 => {
            let user = format!("{}{}", r.pick(LAST).to_lowercase(), r.digits(2));
            n.t("user ").phi("ID", &user)
        }
        6 => n.t("SSN ").phi(
            "ID",
            &format!("{}-{}-{}", r.digits(3), r.digits(2), r.digits(4)),
        ),
        _ => n
            .t("member ID ")
            .phi("ID", &format!("{}{}", "H", r.digits(8))),
    };
}

fn phone(n: &mut Note, r: &mut Rng) {
    let (a, b, c) = (r.digits(3), r.digits(3), r.digits(4));
    let s = match r.below(4) {
        0 => format!("({a}) {b}-{c}"),
        1 => format!("{a}-{b}-{c}"),
        2 => format!("{a}.{b}.{c}"),
        _ => format!("ext. {}", r.digits(4)),
    };
    n.phi("PHONE", &s);
}

fn address(n: &mut Note, r: &mut Rng) {
    n.phi("ADDRESS", &format!("{} {}", r.digits(3), r.pick(STREETS)))
        .t(", ")
        .phi("ADDRESS", r.pick(CITIES))
        .t(", OH ")
        .phi("ADDRESS", &r.digits(5));
}

fn labs(n: &mut Note, r: &mut Rng) {
    let glucose = 70 + r.below(140);
    let a1c = 5 + r.below(5);
    n.t(&format!(
        "Glucose {glucose} mg/dL, HbA1c {a1c}.{}%, creatinine 0.{} mg/dL, BP {}/{} mmHg, \
         LDL 2.{} mmol/L (LOINC 13457-7). ",
        r.below(10),
        7 + r.below(3),
        100 + r.below(60),
        60 + r.below(30),
        r.below(10)
    ));
}

/// Clinical sentences with no PHI, full of words the scrubber must keep: drug names,
/// eponyms that are also surnames, and capitalised words that are also first names.
const CLINICAL_SENTENCES: &[&str] = &[
    "Foley catheter removed on day two. ",
    "History of Parkinson disease, stable on carbidopa. ",
    "Crohn disease in remission; no Graves disease. ",
    "Remote Hodgkin lymphoma, treated. ",
    "Left Bell palsy resolving. ",
    "Murphy sign negative, Homans sign negative. ",
    "Gram stain showed gram-positive cocci in clusters. ",
    "Glasgow Coma Scale 15. Wells score 1. ",
    "Apgar scores 8 and 9. ",
    "No stigmata of Cushing syndrome or Addison disease. ",
    "Barrett esophagus on last endoscopy; Baker cyst behind the right knee. ",
    "Holter monitor for 48 hours; Doppler of the legs negative. ",
    "Babinski absent, Romberg negative, Kernig and Brudzinski signs negative. ",
    "Tenderness at McBurney point. ",
    "Tinel and Phalen tests positive on the right; Lachman test negative. ",
    "Allen test normal before the radial line. Mallampati class II. ",
    "Status post Whipple procedure and Nissen fundoplication. ",
    "Mother had Alzheimer disease; no family history of Huntington disease. ",
    "Hashimoto thyroiditis on levothyroxine 75 mcg daily. ",
    "Will continue warfarin; May need apixaban instead. ",
    "Patient Education given on insulin and metformin. ",
    "Pain controlled with acetaminophen 650 mg and ibuprofen 400 mg. ",
    "Started vancomycin 1 g and azithromycin 500 mg. ",
    "Grace period for the prior authorisation requested. ",
    "Down syndrome screening discussed. ",
    "Albuterol as needed; omeprazole 20 mg daily. ",
];

/// One or two clinical sentences.
fn clinical(n: &mut Note, r: &mut Rng) {
    for _ in 0..1 + r.below(2) {
        n.t(r.pick(CLINICAL_SENTENCES));
    }
}

fn progress_note(r: &mut Rng) -> GoldNote {
    let (pt, doc, cc) = (person(r), person(r), person(r));
    let mut n = Note::new();
    n.t("PROGRESS NOTE\nPatient: ");
    name(&mut n, r, &pt);
    n.t("\n");
    identifier(&mut n, r);
    n.t("\nDate of service: ");
    date(&mut n, r);
    n.t("\n\nS: ");
    n.phi("NAME", pt.first).t(" reports fatigue since ");
    date(&mut n, r);
    n.t(". Seen at ");
    n.phi("LOCATION", r.pick(HOSPITALS)).t(" on ");
    date(&mut n, r);
    n.t(". Daughter ");
    let daughter = person(r);
    n.phi("NAME", &format!("{} {}", daughter.first, pt.last))
        .t(" can be reached at ");
    phone(&mut n, r);
    n.t(".\nO: ");
    labs(&mut n, r);
    clinical(&mut n, r);
    n.t("\nA/P: type 2 diabetes (E11.9), continue metformin 500 mg twice daily. Follow up ");
    date(&mut n, r);
    n.t(".\n\n");
    clinician(&mut n, r, &doc);
    n.t("\ncc: ");
    clinician(&mut n, r, &cc);
    n.t("\n");
    n.done()
}

fn discharge_summary(r: &mut Rng) -> GoldNote {
    let (pt, doc) = (person(r), person(r));
    let mut n = Note::new();
    n.t("DISCHARGE SUMMARY\nName: ");
    name(&mut n, r, &pt);
    n.t("   DOB: ");
    date(&mut n, r);
    n.t("\n");
    identifier(&mut n, r);
    n.t("\nAdmitted: ");
    date(&mut n, r);
    n.t("  Discharged: ");
    date(&mut n, r);
    n.t("\nAddress: ");
    address(&mut n, r);
    n.t("\nHome phone ");
    phone(&mut n, r);
    n.t(", e-mail ");
    n.phi(
        "EMAIL",
        &format!(
            "{}.{}@example-mail.com",
            pt.first.to_lowercase(),
            pt.last.to_lowercase()
        ),
    );
    n.t(if r.below(2) == 0 {
        "\n\nHospital course: Mr. "
    } else {
        "\n\nHospital course: Ms. "
    });
    n.phi("NAME", pt.last)
        .t(" was admitted with community-acquired pneumonia (J18.9). Treated with ceftriaxone 1 g daily. ");
    clinical(&mut n, r);
    if r.below(3) == 0 {
        let age = 90 + r.below(12);
        n.t("The patient is a ")
            .phi("AGE", &age.to_string())
            .t("-year-old retired teacher. ");
    }
    labs(&mut n, r);
    n.t("\nDischarged to home with her husband ");
    let husband = person(r);
    n.phi("NAME", husband.first).t(". Portal: ");
    n.phi(
        "URL",
        &format!("https://portal.example.org/u/{}", r.digits(6)),
    );
    n.t("\n\nSigned: ");
    n.phi(
        "NAME",
        &format!("{} {}. {}", doc.first, doc.middle, doc.last),
    )
    .t(", M.D.\n");
    identifier(&mut n, r);
    n.t("\n");
    n.done()
}

fn radiology(r: &mut Rng) -> GoldNote {
    let (pt, doc) = (person(r), person(r));
    let mut n = Note::new();
    n.t("RADIOLOGY REPORT  ");
    n.phi("LOCATION", r.pick(HOSPITALS)).t("\nPatient ");
    name(&mut n, r, &pt);
    n.t(", ");
    identifier(&mut n, r);
    n.t("\nExam date ");
    date(&mut n, r);
    n.t(". Comparison: prior study of ");
    date(&mut n, r);
    n.t(
        ".\nCT chest without contrast. A 4 mm nodule in the right upper lobe, unchanged. \
         No effusion. ",
    );
    clinical(&mut n, r);
    n.t("Workstation ");
    n.phi(
        "IP",
        &format!("10.{}.{}.{}", r.below(256), r.below(256), r.below(256)),
    );
    n.t(".\nImpression: stable. Discussed with ");
    clinician(&mut n, r, &doc);
    n.t(" on ");
    date(&mut n, r);
    n.t(" by phone ");
    phone(&mut n, r);
    n.t(".\n");
    n.done()
}

fn lab_narrative(r: &mut Rng) -> GoldNote {
    let (pt, tech) = (person(r), person(r));
    let mut n = Note::new();
    n.t("LAB NARRATIVE\n");
    name(&mut n, r, &pt);
    n.t(" (");
    identifier(&mut n, r);
    n.t(")\nCollected ");
    date(&mut n, r);
    n.t(", received ");
    date(&mut n, r);
    n.t(". ");
    labs(&mut n, r);
    clinical(&mut n, r);
    n.t("Specimen hemolysed; recollect requested by ");
    n.phi("NAME", &format!("{}. {}", &tech.first[..1], tech.last));
    n.t(". Results faxed to ");
    phone(&mut n, r);
    n.t(". ");
    identifier(&mut n, r);
    n.t("\n");
    n.done()
}

/// `count` notes from `seed`, the four kinds in turn.
pub fn notes(count: usize, seed: u64) -> Vec<GoldNote> {
    let mut r = Rng(seed);
    (0..count)
        .map(|i| match i % 4 {
            0 => progress_note(&mut r),
            1 => discharge_summary(&mut r),
            2 => radiology(&mut r),
            _ => lab_narrative(&mut r),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_gold_set_is_deterministic_large_and_its_spans_hold_what_they_say() {
        let set = notes(320, 7);
        assert_eq!(set, notes(320, 7));
        assert_ne!(set, notes(320, 8));
        let spans: usize = set.iter().map(|n| n.spans.len()).sum();
        assert!(spans >= 3000, "{spans} spans");
        let mut forms = BTreeSet::new();
        for note in &set {
            let chars: Vec<char> = note.text.chars().collect();
            for s in &note.spans {
                let text: String = chars[s.start..s.end].iter().collect();
                assert!(!text.trim().is_empty() && text.trim() == text, "{text:?}");
                // The surface form: letters as a, digits as 9.
                let form: String = text
                    .chars()
                    .map(|c| match c {
                        c if c.is_ascii_digit() => '9',
                        c if c.is_alphabetic() => 'a',
                        c => c,
                    })
                    .collect::<String>()
                    .split('a')
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join("a");
                forms.insert((s.kind.clone(), form));
            }
        }
        assert!(forms.len() >= 20, "{} surface forms", forms.len());
    }
}
