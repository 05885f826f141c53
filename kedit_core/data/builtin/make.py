"""Build the built-in edit set from the fact table below and check it with a model.

    python -m kedit_core.data.builtin.make            # check with smollm2-135m and write
    python -m kedit_core.data.builtin.make --all      # keep facts the model does not know too

Each relation has a rewrite template, two paraphrase templates and true facts written by
us. A fact is kept when the model ranks its true answer's first token first after the
rewrite prompt (it "knows" it). Each edit's target_new is the true object of another
subject of the same relation (a counterfactual, as in CounterFact); its five neighbourhood
prompts are the rewrite template on five other subjects of that relation, with their true
answers (CounterFact's neighbourhood construction, Meng et al. 2202.05262 section 3).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# relation id: (rewrite template, (paraphrase templates), [(subject, true object), ...])
RELATIONS: dict[str, tuple[str, tuple[str, str], list[tuple[str, str]]]] = {
    # Templates chosen by measurement on smollm2-135m (the share of facts whose true answer
    # it ranks first): "The capital of {} is the city of" 27/32 vs "The capital of {} is"
    # 23/32; "{} is located in the country of" 27/48 vs "{} is the capital of" 19/48.
    "capital": ("The capital of {} is the city of", ("{}'s capital city is", "The capital city of {} is"), [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
        ("Spain", "Madrid"), ("Russia", "Moscow"), ("England", "London"), ("China", "Beijing"),
        ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
        ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
        ("Canada", "Ottawa"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
        ("Cuba", "Havana"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
        ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("South Korea", "Seoul"),
        ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
        ("Iran", "Tehran"), ("Scotland", "Edinburgh"), ("Chile", "Santiago"),
        ("Switzerland", "Bern"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"),
        ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota"),
        ("Venezuela", "Caracas"), ("Saudi Arabia", "Riyadh"), ("Iraq", "Baghdad"),
        ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Nepal", "Kathmandu"), ("Vietnam", "Hanoi"),
        ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Iceland", "Reykjavik"), ("Wales", "Cardiff"),
        ("Mexico", "Mexico City"), ("Ukraine", "Kyiv"), ("Pakistan", "Islamabad"),
    ]),
    "landmark_city": ("{} is located in the city of", ("{} stands in the city of", "You can visit {} in the city of"), [
        ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
        ("The Statue of Liberty", "New York"), ("The Brandenburg Gate", "Berlin"),
        ("The Sagrada Familia", "Barcelona"), ("The Kremlin", "Moscow"),
        ("The Golden Gate Bridge", "San Francisco"), ("The Sydney Opera House", "Sydney"),
        ("The Taj Mahal", "Agra"), ("The Acropolis", "Athens"), ("The Space Needle", "Seattle"),
        ("The Louvre", "Paris"), ("Buckingham Palace", "London"), ("The Forbidden City", "Beijing"),
        ("Tokyo Tower", "Tokyo"), ("The Vatican", "Rome"), ("The White House", "Washington"),
        ("The Empire State Building", "New York"), ("The Leaning Tower of Pisa", "Pisa"),
        ("The Parthenon", "Athens"), ("The Tower of London", "London"), ("Times Square", "New York"),
        ("The Hagia Sophia", "Istanbul"), ("The Alamo", "San Antonio"), ("Westminster Abbey", "London"),
        ("Notre-Dame Cathedral", "Paris"), ("The Trevi Fountain", "Rome"), ("The Pantheon", "Rome"),
        ("The Arc de Triomphe", "Paris"), ("Red Square", "Moscow"), ("The CN Tower", "Toronto"),
        ("The Burj Khalifa", "Dubai"), ("Central Park", "New York"), ("The Rialto Bridge", "Venice"),
        ("The Prado Museum", "Madrid"), ("The Alhambra", "Granada"), ("Wall Street", "New York"),
        ("The Willis Tower", "Chicago"), ("The Gateway Arch", "St. Louis"),
    ]),
    "city_country": ("{} is located in the country of", ("{} is a city in", "The city of {} lies in"), [
        ("Paris", "France"), ("Tokyo", "Japan"), ("Rome", "Italy"), ("Berlin", "Germany"),
        ("Madrid", "Spain"), ("Moscow", "Russia"), ("London", "England"), ("Beijing", "China"),
        ("Cairo", "Egypt"), ("Athens", "Greece"), ("Lisbon", "Portugal"), ("Vienna", "Austria"),
        ("Dublin", "Ireland"), ("Oslo", "Norway"), ("Stockholm", "Sweden"), ("Warsaw", "Poland"),
        ("Ottawa", "Canada"), ("Bangkok", "Thailand"), ("Nairobi", "Kenya"), ("Havana", "Cuba"),
        ("Budapest", "Hungary"), ("Copenhagen", "Denmark"), ("Toronto", "Canada"),
        ("Sydney", "Australia"), ("Mumbai", "India"), ("Barcelona", "Spain"), ("Munich", "Germany"),
        ("Milan", "Italy"), ("Osaka", "Japan"), ("Shanghai", "China"), ("Istanbul", "Turkey"),
        ("Brussels", "Belgium"), ("Lagos", "Nigeria"), ("Manchester", "England"), ("Venice", "Italy"),
        ("Kyoto", "Japan"), ("Marseille", "France"), ("Hamburg", "Germany"), ("Melbourne", "Australia"),
        ("Vancouver", "Canada"), ("Delhi", "India"), ("Lyon", "France"), ("Naples", "Italy"),
        ("Seville", "Spain"), ("Florence", "Italy"), ("Krakow", "Poland"), ("Porto", "Portugal"),
        ("Montreal", "Canada"), ("Kolkata", "India"), ("Alexandria", "Egypt"),
    ]),
    "language": ("The official language of {} is", ("People in {} speak", "In {}, most people speak"), [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Japan", "Japanese"), ("Russia", "Russian"), ("China", "Chinese"), ("Brazil", "Portuguese"),
        ("Portugal", "Portuguese"), ("Mexico", "Spanish"), ("Greece", "Greek"),
        ("the Netherlands", "Dutch"), ("Poland", "Polish"), ("Sweden", "Swedish"),
        ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("South Korea", "Korean"), ("Israel", "Hebrew"),
        ("Finland", "Finnish"), ("Hungary", "Hungarian"), ("Argentina", "Spanish"),
        ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Iran", "Persian"), ("Vietnam", "Vietnamese"),
        ("Colombia", "Spanish"), ("Austria", "German"), ("Peru", "Spanish"), ("Saudi Arabia", "Arabic"),
    ]),
    "continent": ("{} is located in the continent of", ("{} is part of the continent of", "Geographically, {} belongs to the continent of"), [
        ("Kenya", "Africa"), ("France", "Europe"), ("Japan", "Asia"), ("Nigeria", "Africa"),
        ("Germany", "Europe"), ("China", "Asia"), ("Egypt", "Africa"), ("India", "Asia"),
        ("Italy", "Europe"), ("Ghana", "Africa"), ("Thailand", "Asia"), ("Poland", "Europe"),
        ("Vietnam", "Asia"), ("Ethiopia", "Africa"), ("Spain", "Europe"), ("Mongolia", "Asia"),
        ("Uganda", "Africa"), ("Norway", "Europe"), ("Tanzania", "Africa"), ("Sweden", "Europe"),
    ]),
    "maker": ("{} is a product made by", ("{} was developed by the company", "The company behind {} is"), [
        ("The iPhone", "Apple"), ("Windows", "Microsoft"), ("The PlayStation", "Sony"),
        ("Android", "Google"), ("The Xbox", "Microsoft"), ("The Galaxy S", "Samsung"),
        ("The MacBook", "Apple"), ("The Model S", "Tesla"), ("Photoshop", "Adobe"),
        ("The ThinkPad", "Lenovo"), ("The iPad", "Apple"), ("The Switch", "Nintendo"),
    ]),
}


def build(seed: int = 0) -> list[dict]:
    """All candidate edits of the fact table, in CounterFact (ROME) record format."""
    rng = random.Random(seed)
    out = []
    for rel, (template, paras, facts) in RELATIONS.items():
        objects = sorted({o for _, o in facts})
        for i, (subject, true) in enumerate(facts):
            choices = [o for o in objects if o != true]
            new = "Rome" if subject == "The Eiffel Tower" else rng.choice(choices)
            others = [(s, o) for s, o in facts if s != subject and o != new]
            rng.shuffle(others)
            out.append({
                "case_id": f"{rel}-{i:02d}",
                "requested_rewrite": {"prompt": template, "subject": subject, "relation_id": rel,
                                      "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [p.replace("{}", subject) for p in paras],
                "neighborhood_prompts": [template.replace("{}", s) for s, _ in others[:5]],
                "neighborhood_answers": [o for _, o in others[:5]],
                "attribute_prompts": [], "generation_prompts": [
                    template.replace("{}", subject), paras[0].replace("{}", subject)],
            })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--all", action="store_true", help="keep facts the model does not know too")
    ap.add_argument("--out", default=str(Path(__file__).with_name("counterfacts.jsonl")))
    args = ap.parse_args(argv)
    from kedit_core.generation import first_token_ranks
    from kedit_core.models import load

    recs = build()
    lm = load(args.model, device="cpu")
    rw = [r["requested_rewrite"] for r in recs]
    ranks = first_token_ranks(lm, [x["prompt"].replace("{}", x["subject"]) for x in rw],
                              [x["target_true"]["str"] for x in rw])
    known = {(x["subject"], x["relation_id"]) for x, k in zip(rw, ranks) if k == 0}
    kept = []
    for rec, rank in zip(recs, ranks):
        if rank != 0 and not args.all:
            continue
        # Neighbourhood prompts only on subjects the model also knows.
        rel = rec["requested_rewrite"]["relation_id"]
        nb = [(p, a) for p, a, s in _neighbours(rec) if (s, rel) in known]
        rec["neighborhood_prompts"] = [p for p, _ in nb[:5]]
        rec["neighborhood_answers"] = [a for _, a in nb[:5]]
        if len(nb) >= 5:
            kept.append(rec)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"{sum(k == 0 for k in ranks)}/{len(ranks)} true answers ranked first by {args.model}; "
          f"wrote {len(kept)} edits to {args.out}")


def _neighbours(rec):
    rel = rec["requested_rewrite"]["relation_id"]
    template, _, facts = RELATIONS[rel]
    subject = rec["requested_rewrite"]["subject"]
    new = rec["requested_rewrite"]["target_new"]["str"]
    rng = random.Random(rec["case_id"])
    others = [(template.replace("{}", s), o, s) for s, o in facts if s != subject and o != new]
    rng.shuffle(others)
    return others


if __name__ == "__main__":
    main()
