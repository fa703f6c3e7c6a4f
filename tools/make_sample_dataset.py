"""Generate glmtune's small built-in Chinese sample dataset.

Writes ``glmtune/sample_data/train.jsonl`` (400 rows) and
``glmtune/sample_data/dev.jsonl`` (60 rows).  Every row is
``{"context": ..., "target": ...}`` in the style of the ChatGLM multi-task
tutorial data, mixing two tasks (55% / 45% in both splits):

* information extraction: a sentence built from templates and invented names,
  answered with a fenced JSON list of (subject, predicate, object,
  subject_type, object_type) triples;
* review-subject classification: a short product/service review, answered with
  a JSON list holding one label such as ``["手机"]``.

All sentences, vocabularies and templates are written for this project (no
third-party data), so the sample set can ship with the package and be used for
smoke tests and quick demos: contexts are short enough that a ~135M-parameter
model learns the format within a few minutes of CPU training.

The output is fully deterministic (seeded ``random.Random``, no hashing-order
dependence); ``--check`` regenerates in memory and fails if the files on disk
differ.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
N_TRAIN = 400
N_DEV = 60
EXTRACTION_SHARE = 0.55

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "glmtune" / "sample_data"

# --------------------------------------------------------------------------- #
# Prompt pieces
# --------------------------------------------------------------------------- #
# Short on purpose: every prompt token costs training time on a CPU, and the demo must finish in minutes.
ROLES = [
    "你是信息抽取助手。",
    "请按要求回答。",
    "你是中文文本助手。",
    "请认真完成任务。",
]

EXTRACTION_ASKS = [
    "抽取三元组，用json返回：",
    "找出句中的三元组，输出json：",
    "提取三元组，以json表示：",
    "这句话有哪些三元组？用json回答：",
    "列出句子里的三元组，返回json：",
]

CLASSIFY_ASKS = [
    "这条评论说的是什么？用列表回答：",
    "评论的对象是什么？列表回答：",
    "评价的是哪类商品？用列表返回：",
    "说的是什么东西？以列表回答：",
]

# --------------------------------------------------------------------------- #
# Vocabularies for the extraction task
# --------------------------------------------------------------------------- #
SURNAMES = list(
    "王李张刘陈杨黄赵周吴徐孙马朱胡郭何林罗高梁宋郑谢韩唐冯董程曹袁邓许"
    "傅沈曾彭吕苏卢蒋蔡贾丁魏薛叶余潘杜戴夏钟汪田任姜范方石姚谭廖邹熊金"
    "陆郝孔白崔康毛邱秦江史顾侯邵孟龙段雷钱汤尹黎易常武乔贺赖龚"
)
GIVEN_CHARS = list(
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚华玉萍红鹏辉建晓宇欣然浩"
    "天思雨嘉子梓俊博文睿泽晨诗佳可雪雅琳志海云凯婷亮昊彤瑶航远舟宁安"
)

CITIES = [
    "北京", "上海", "天津", "重庆", "广州", "深圳", "杭州", "南京", "苏州",
    "武汉", "成都", "西安", "长沙", "青岛", "大连", "厦门", "宁波", "无锡",
    "合肥", "郑州", "济南", "昆明", "福州", "沈阳", "哈尔滨", "长春", "南昌",
    "贵阳", "太原", "石家庄", "兰州", "洛阳", "扬州", "绍兴", "桂林", "温州",
    "烟台", "徐州",
]

# (province, capital) -- real facts.
PROVINCE_CAPITALS = [
    ("广东", "广州"), ("浙江", "杭州"), ("江苏", "南京"), ("湖北", "武汉"),
    ("四川", "成都"), ("湖南", "长沙"), ("山东", "济南"), ("河南", "郑州"),
    ("陕西", "西安"), ("安徽", "合肥"), ("福建", "福州"), ("江西", "南昌"),
    ("云南", "昆明"), ("贵州", "贵阳"), ("辽宁", "沈阳"), ("吉林", "长春"),
    ("黑龙江", "哈尔滨"), ("河北", "石家庄"), ("山西", "太原"), ("甘肃", "兰州"),
    ("海南", "海口"), ("青海", "西宁"),
]

UNIVERSITIES = [
    "北京大学", "清华大学", "复旦大学", "浙江大学", "南京大学", "武汉大学",
    "中山大学", "四川大学", "厦门大学", "山东大学", "吉林大学", "南开大学",
    "同济大学", "湖南大学", "重庆大学", "兰州大学", "北京电影学院",
    "中央戏剧学院", "上海戏剧学院", "中央音乐学院",
]

TITLE_HEADS = [
    "远方", "夜色", "春风", "长河", "山海", "星光", "归途", "雾中", "北岸",
    "孤城", "青石", "白鹭", "晚风", "初雪", "旧梦", "江南", "明月", "落日",
    "深蓝", "南山", "流云", "故乡", "碧海", "风铃", "灯火", "沙洲", "冬至",
    "萤火", "长街", "溪畔",
]
FILM_TAILS = ["行动", "往事", "追踪", "迷局", "少年", "风暴", "密码", "来客", "疑云", "奇缘", "之战", "时代"]
BOOK_TAILS = ["笔记", "旧事", "纪年", "手记", "札记", "人家", "春秋", "之书", "杂记", "往来"]
SONG_TAILS = ["之恋", "来信", "晚安", "回声", "心事", "慢歌", "小调", "情书", "序曲", "告白"]
ALBUM_TAILS = ["时光", "日记", "漫游", "同行", "手札", "映像", "之声", "旅程"]
SHOW_HEADS = ["一起", "快乐", "周末", "欢乐", "奇妙", "全能", "闪亮", "向前"]
SHOW_TAILS = ["大冒险", "训练营", "挑战者", "同学会", "游记", "厨房", "旅行团", "运动会"]

COMPANY_BRANDS = [
    "云帆", "青禾", "远拓", "蓝湾", "木棉", "恒岳", "启辰", "银杉", "朗峰",
    "拓川", "明澜", "栖梧", "澄星", "嘉林", "鸿屿", "若水",
]
COMPANY_TRADES = ["科技", "食品", "物流", "文化", "医药", "电子", "教育", "传媒", "能源", "建材"]

PUBLISHER_HEADS = ["春潮", "北辰", "青藤", "远山", "星火", "明湖", "长风", "新叶", "白塔", "东篱"]
PUBLISHER_TAILS = ["出版社", "文艺出版社", "书局"]

# --------------------------------------------------------------------------- #
# Vocabularies for the classification task
# --------------------------------------------------------------------------- #
LABEL_CLAUSES = {
    "手机": [
        "屏幕显示很清晰", "电池一天一充完全够用", "拍照效果比旧手机好多了",
        "打游戏不卡也不发烫", "充电速度特别快", "手感很好，单手握着正合适",
        "系统很流畅，没有广告", "前置摄像头自拍很自然", "通话声音清楚，听筒音量大",
        "换了新手机以后信号好多了",
    ],
    "酒店": [
        "房间干净整洁，床很舒服", "前台办理入住很快", "早餐种类丰富",
        "离地铁站很近，出行方便", "隔音一般，晚上能听到走廊的声音", "卫生间热水很足",
        "窗外就能看到江景", "服务员帮忙寄存了行李", "房间有点小，但是够住",
        "退房手续很简单",
    ],
    "水果": [
        "橙子很甜，水分充足", "苹果脆甜，个头也大", "芒果熟度刚好，香味浓",
        "葡萄颗粒饱满，没有坏果", "西瓜是沙瓤的，很甜", "荔枝很新鲜，果肉白嫩",
        "猕猴桃放了两天就软了，很好吃", "草莓有点酸", "樱桃个头很大，颜色深红",
        "香蕉有几根已经熟过头了",
    ],
    "书籍": [
        "印刷清晰，纸张也厚实", "故事情节很吸引人", "译者翻译得很流畅",
        "作者的文笔很好", "书的封面有折痕", "内容适合孩子阅读",
        "一口气读完了，意犹未尽", "字体大小合适，看着不累", "章节安排有条理，读起来不费劲",
        "书页有点发黄",
    ],
    "衣服": [
        "面料柔软，穿着很舒服", "尺码偏小，建议买大一号", "外套颜色和图片一样",
        "洗了一次有点掉色", "版型很好，穿上显瘦", "做工精细，没有线头",
        "领口有点紧", "毛衣冬天穿很暖和", "裤子长度刚刚好", "衬衫不容易起皱",
    ],
    "电脑": [
        "笔记本开机速度很快", "键盘手感不错，打字舒服", "屏幕分辨率高，看视频很清楚",
        "运行大型软件也不卡", "散热风扇声音有点大", "机身很轻，出差带着方便",
        "接口比较少，需要转接头", "续航能撑一整天的办公", "触控板很灵敏",
        "内存和硬盘都够用",
    ],
    "洗发水": [
        "洗完头发很顺滑", "味道很香，留香时间长", "去屑效果明显",
        "泡沫很丰富，很好冲洗", "用了以后头皮不痒了", "瓶子的按压泵很好用",
        "洗完头发有点干", "一大瓶能用好久", "头发不那么油了",
        "成分温和，不刺激头皮",
    ],
    "外卖": [
        "饭菜送到还是热的", "分量很足，两个人都吃不完", "送餐小哥很准时",
        "菜有点咸", "米饭有点硬", "汤洒了一点，包装要改进",
        "鸡肉很嫩，酱汁很香", "等了一个多小时才送到", "味道很正宗，和店里吃的一样",
        "餐盒很干净，还送了饮料",
    ],
}
LABELS = list(LABEL_CLAUSES)

GENERIC_CLAUSES = [
    "总体来说很满意", "性价比挺高的", "整体体验不错", "价格有点贵",
    "还算可以吧", "推荐给大家", "有点失望", "给个好评", "不太值这个价",
    "会继续支持的", "一般般，没有想象中好", "和描述的基本一致",
    "已经推荐给朋友了",
]
# Only for things that are shipped (not for hotels / takeaway).
SHIPPED_CLAUSES = ["物流很快，下次还会再来买", "快递第二天就到了", "包装很严实", "已经回购好几次了"]
NOT_SHIPPED = {"酒店", "外卖"}

REVIEW_MIN_LEN = 15
REVIEW_MAX_LEN = 45


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def triple(subject: str, predicate: str, obj: str, subject_type: str, object_type: str) -> dict:
    # Key order matters: subject, predicate, object, subject_type, object_type.
    return {
        "subject": subject,
        "predicate": predicate,
        "object": obj,
        "subject_type": subject_type,
        "object_type": object_type,
    }


class Vocab:
    """Draws slot fillers from the vocabularies with one shared RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def people(self, k: int) -> list[str]:
        names: list[str] = []
        while len(names) < k:
            given = "".join(self.rng.sample(GIVEN_CHARS, self.rng.choice((1, 2, 2))))
            name = self.rng.choice(SURNAMES) + given
            if all(name not in n and n not in name for n in names):
                names.append(name)
        return names

    def person(self) -> str:
        return self.people(1)[0]

    def year(self) -> str:
        return f"{self.rng.randint(1950, 2020)}年"

    def city(self) -> str:
        return self.rng.choice(CITIES)

    def univ(self) -> str:
        return self.rng.choice(UNIVERSITIES)

    def _titles(self, tails: list[str], k: int) -> list[str]:
        heads = self.rng.sample(TITLE_HEADS, k)
        return [h + self.rng.choice(tails) for h in heads]

    def film(self) -> str:
        return self._titles(FILM_TAILS, 1)[0]

    def book(self) -> str:
        return self._titles(BOOK_TAILS, 1)[0]

    def song_and_album(self) -> tuple[str, str]:
        heads = self.rng.sample(TITLE_HEADS, 2)
        return heads[0] + self.rng.choice(SONG_TAILS), heads[1] + self.rng.choice(ALBUM_TAILS)

    def film_and_book(self) -> tuple[str, str]:
        heads = self.rng.sample(TITLE_HEADS, 2)
        return heads[0] + self.rng.choice(FILM_TAILS), heads[1] + self.rng.choice(BOOK_TAILS)

    def album(self) -> str:
        return self._titles(ALBUM_TAILS, 1)[0]

    def show(self) -> str:
        return self.rng.choice(SHOW_HEADS) + self.rng.choice(SHOW_TAILS)

    def company(self) -> str:
        return self.rng.choice(COMPANY_BRANDS) + self.rng.choice(COMPANY_TRADES)

    def publisher(self) -> str:
        return self.rng.choice(PUBLISHER_HEADS) + self.rng.choice(PUBLISHER_TAILS)


# Each template: (vocab, variant index) -> (sentence, triples).
def t_person_profile(v: Vocab, i: int):
    p, y, c, u = v.person(), v.year(), v.city(), v.univ()
    born_d = triple(p, "出生日期", y, "人物", "Date")
    born_p = triple(p, "出生地", c, "人物", "地点")
    school = triple(p, "毕业院校", u, "人物", "学校")
    if i == 0:
        return f"{p}，{y}出生于{c}，毕业于{u}。", [born_d, born_p, school]
    if i == 1:
        return f"{p}生于{y}，老家在{c}。", [born_d, born_p]
    return f"毕业于{u}的{p}出生在{c}。", [school, born_p]


def t_film(v: Vocab, i: int):
    f = v.film()
    d, a1, a2 = v.people(3)
    if i == 0:
        return f"《{f}》是一部由{d}执导、{a1}主演的电影。", [
            triple(f, "导演", d, "影视作品", "人物"),
            triple(f, "主演", a1, "影视作品", "人物"),
        ]
    if i == 1:
        return f"电影《{f}》的导演是{d}，主演有{a1}和{a2}。", [
            triple(f, "导演", d, "影视作品", "人物"),
            triple(f, "主演", a1, "影视作品", "人物"),
            triple(f, "主演", a2, "影视作品", "人物"),
        ]
    y = v.year()
    return f"{d}导演的《{f}》于{y}上映。", [
        triple(f, "导演", d, "影视作品", "人物"),
        triple(f, "上映时间", y, "影视作品", "Date"),
    ]


def t_company(v: Vocab, i: int):
    co, y, c, p = v.company(), v.year(), v.city(), v.person()
    if i == 0:
        return f"{co}成立于{y}，总部位于{c}。", [
            triple(co, "成立日期", y, "企业", "Date"),
            triple(co, "总部地点", c, "企业", "地点"),
        ]
    if i == 1:
        return f"{y}，{p}创办了{co}。", [
            triple(co, "创始人", p, "企业", "人物"),
            triple(co, "成立日期", y, "企业", "Date"),
        ]
    return f"{co}由{p}创立，公司总部设在{c}。", [
        triple(co, "创始人", p, "企业", "人物"),
        triple(co, "总部地点", c, "企业", "地点"),
    ]


def t_novel(v: Vocab, i: int):
    b, p, pub = v.book(), v.person(), v.publisher()
    if i == 0:
        return f"《{b}》是{p}创作的长篇小说，由{pub}出版。", [
            triple(b, "作者", p, "图书作品", "人物"),
            triple(b, "出版社", pub, "图书作品", "出版社"),
        ]
    if i == 1:
        return f"{pub}于{v.year()}出版了{p}的小说《{b}》。", [
            triple(b, "出版社", pub, "图书作品", "出版社"),
            triple(b, "作者", p, "图书作品", "人物"),
        ]
    return f"小说《{b}》的作者是{p}。", [triple(b, "作者", p, "图书作品", "人物")]


def t_song(v: Vocab, i: int):
    s, a = v.song_and_album()
    p1, p2 = v.people(2)
    if i == 0:
        return f"《{s}》是{p1}演唱的歌曲，收录在专辑《{a}》中。", [
            triple(s, "歌手", p1, "歌曲", "人物"),
            triple(s, "所属专辑", a, "歌曲", "音乐专辑"),
        ]
    if i == 1:
        return f"{p1}的专辑《{a}》里有一首《{s}》。", [
            triple(s, "歌手", p1, "歌曲", "人物"),
            triple(s, "所属专辑", a, "歌曲", "音乐专辑"),
        ]
    return f"歌曲《{s}》由{p2}作词，{p1}演唱。", [
        triple(s, "作词", p2, "歌曲", "人物"),
        triple(s, "歌手", p1, "歌曲", "人物"),
    ]


def t_capital(v: Vocab, i: int):
    (p1, c1), (p2, c2) = v.rng.sample(PROVINCE_CAPITALS, 2)
    if i == 0:
        return f"{c1}是{p1}省的省会。", [triple(p1, "省会", c1, "行政区", "城市")]
    if i == 1:
        return f"{p1}省的省会城市是{c1}。", [triple(p1, "省会", c1, "行政区", "城市")]
    return f"{c1}是{p1}的省会，{c2}是{p2}的省会。", [
        triple(p1, "省会", c1, "行政区", "城市"),
        triple(p2, "省会", c2, "行政区", "城市"),
    ]


def t_spouse(v: Vocab, i: int):
    h, w = v.people(2)
    if i == 0:
        return f"{h}和妻子{w}于{v.year()}结婚。", [
            triple(h, "妻子", w, "人物", "人物"),
            triple(w, "丈夫", h, "人物", "人物"),
        ]
    if i == 1:
        return f"{w}的丈夫是{h}，两人都是演员。", [triple(w, "丈夫", h, "人物", "人物")]
    return f"{h}的妻子{w}出生于{v.city()}。", [triple(h, "妻子", w, "人物", "人物")]


def t_adaptation(v: Vocab, i: int):
    f, b = v.film_and_book()
    d, p = v.people(2)
    if i == 0:
        return f"电影《{f}》改编自小说《{b}》，原著作者是{p}。", [
            triple(f, "改编自", b, "影视作品", "作品"),
            triple(b, "作者", p, "图书作品", "人物"),
        ]
    if i == 1:
        return f"{p}的小说《{b}》被拍成了电影《{f}》，由{d}执导。", [
            triple(f, "改编自", b, "影视作品", "作品"),
            triple(b, "作者", p, "图书作品", "人物"),
            triple(f, "导演", d, "影视作品", "人物"),
        ]
    return f"《{f}》根据《{b}》改编。", [triple(f, "改编自", b, "影视作品", "作品")]


def t_show(v: Vocab, i: int):
    s = v.show()
    p1, p2 = v.people(2)
    if i == 0:
        return f"《{s}》是一档综艺节目，主持人是{p1}和{p2}。", [
            triple(s, "主持人", p1, "电视综艺", "人物"),
            triple(s, "主持人", p2, "电视综艺", "人物"),
        ]
    y = v.year()
    if i == 1:
        return f"{p1}主持的《{s}》首播于{y}。", [
            triple(s, "主持人", p1, "电视综艺", "人物"),
            triple(s, "首播时间", y, "电视综艺", "Date"),
        ]
    return f"综艺《{s}》在{y}开播，由{p1}主持。", [
        triple(s, "首播时间", y, "电视综艺", "Date"),
        triple(s, "主持人", p1, "电视综艺", "人物"),
    ]


def t_chairman(v: Vocab, i: int):
    p, co, c, u = v.person(), v.company(), v.city(), v.univ()
    if i == 0:
        return f"{p}是{c}人，现任{co}董事长。", [
            triple(p, "籍贯", c, "人物", "地点"),
            triple(co, "董事长", p, "企业", "人物"),
        ]
    if i == 1:
        return f"{co}的董事长{p}祖籍{c}。", [
            triple(co, "董事长", p, "企业", "人物"),
            triple(p, "籍贯", c, "人物", "地点"),
        ]
    return f"{p}毕业于{u}，后来出任{co}的董事长。", [
        triple(p, "毕业院校", u, "人物", "学校"),
        triple(co, "董事长", p, "企业", "人物"),
    ]


def t_family(v: Vocab, i: int):
    child, father = v.people(2)
    if i == 0:
        return f"{child}的父亲{father}是一名医生。", [triple(child, "父亲", father, "人物", "人物")]
    y = v.year()
    if i == 1:
        return f"{father}是{child}的父亲，{child}出生于{y}。", [
            triple(child, "父亲", father, "人物", "人物"),
            triple(child, "出生日期", y, "人物", "Date"),
        ]
    c = v.city()
    return f"{y}，{child}出生在{c}，父亲是{father}。", [
        triple(child, "出生日期", y, "人物", "Date"),
        triple(child, "出生地", c, "人物", "地点"),
        triple(child, "父亲", father, "人物", "人物"),
    ]


def t_album(v: Vocab, i: int):
    a, p, y = v.album(), v.person(), v.year()
    if i == 0:
        return f"{p}在{y}发行了专辑《{a}》。", [
            triple(a, "歌手", p, "音乐专辑", "人物"),
            triple(a, "发行时间", y, "音乐专辑", "Date"),
        ]
    if i == 1:
        return f"专辑《{a}》发行于{y}，演唱者是{p}。", [
            triple(a, "发行时间", y, "音乐专辑", "Date"),
            triple(a, "歌手", p, "音乐专辑", "人物"),
        ]
    return f"《{a}》是{p}的第一张个人专辑。", [triple(a, "歌手", p, "音乐专辑", "人物")]


TEMPLATES = [
    t_person_profile, t_film, t_company, t_novel, t_song, t_capital,
    t_spouse, t_adaptation, t_show, t_chairman, t_family, t_album,
]


def make_extraction(rng: random.Random, v: Vocab) -> tuple[str, str, str]:
    template = rng.choice(TEMPLATES)
    sentence, triples = template(v, rng.randrange(3))
    for t in triples:
        for key in ("subject", "object"):
            if not t[key] or t[key] not in sentence:
                raise AssertionError(f"{key} {t[key]!r} not in {sentence!r}")
    assert 1 <= len(triples) <= 3, sentence
    context = (
        f"Instruction: {rng.choice(ROLES)}\n"
        f"Input: {rng.choice(EXTRACTION_ASKS)}\n\n{sentence}\nAnswer: "
    )
    target = "```json\n" + json.dumps(triples, ensure_ascii=False) + "\n```"
    return sentence, context, target


def make_review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    generic = GENERIC_CLAUSES if label in NOT_SHIPPED else GENERIC_CLAUSES + SHIPPED_CLAUSES
    while True:
        parts = rng.sample(LABEL_CLAUSES[label], rng.choice((1, 2)))
        if rng.random() < 0.6:
            extra = rng.choice(generic)
            if rng.random() < 0.75:
                parts.append(extra)
            else:
                parts.insert(0, extra)
        review = "，".join(parts) + "。"
        if REVIEW_MIN_LEN <= len(review) <= REVIEW_MAX_LEN:
            return label, review


def make_classification(rng: random.Random) -> tuple[str, str, str]:
    label, review = make_review(rng)
    context = (
        f"Instruction: {rng.choice(ROLES)}\n"
        f"Input: {rng.choice(CLASSIFY_ASKS)}\n\n{review}\nAnswer: "
    )
    return review, context, json.dumps([label], ensure_ascii=False)


def _unique_rows(n: int, make, seen: set[str]) -> list[dict]:
    """Draw ``n`` rows whose body text (sentence / review) is new to ``seen``."""
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > n * 200:
            raise RuntimeError("could not draw enough unique rows")
        body, context, target = make()
        if body in seen:
            continue
        seen.add(body)
        rows.append({"context": context, "target": target})
    return rows


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    vocab = Vocab(rng)
    n_ext_train = round(N_TRAIN * EXTRACTION_SHARE)
    n_ext_dev = round(N_DEV * EXTRACTION_SHARE)
    seen: set[str] = set()  # membership only, never iterated
    ext = _unique_rows(n_ext_train + n_ext_dev, lambda: make_extraction(rng, vocab), seen)
    cls = _unique_rows(
        (N_TRAIN - n_ext_train) + (N_DEV - n_ext_dev), lambda: make_classification(rng), seen
    )
    train = ext[:n_ext_train] + cls[: N_TRAIN - n_ext_train]
    dev = ext[n_ext_train:] + cls[N_TRAIN - n_ext_train :]
    rng.shuffle(train)
    rng.shuffle(dev)
    return {"train": train, "dev": dev}


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"where to write train.jsonl / dev.jsonl (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and exit 1 if the files on disk differ")
    args = parser.parse_args(argv)

    outputs = {f"{name}.jsonl": render(rows) for name, rows in build_splits().items()}
    if args.check:
        stale = []
        for fname, data in outputs.items():
            path = args.output_dir / fname
            if not path.is_file() or path.read_bytes() != data:
                stale.append(str(path))
        if stale:
            print("sample dataset out of date (run tools/make_sample_dataset.py): " + ", ".join(stale),
                  file=sys.stderr)
            return 1
        print(f"sample dataset in {args.output_dir} is up to date")
        return 0

    args.output_dir.mkdir(parents=True, exist_ok=True)
    for fname, data in outputs.items():
        (args.output_dir / fname).write_bytes(data)
        n_rows = data.count(b"\n")
        print(f"wrote {args.output_dir / fname} ({n_rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
